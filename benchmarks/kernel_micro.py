#!/usr/bin/env python
"""Time mlx_dpo.cpu_kernels one at a time on random inputs: each flash attention block size
against mlx-lm's attention (one layer's forward + backward, as kernel_choice times them), the
exp, and the fused SwiGLU's forward and backward. Compiled, one warm-up, then --rounds rounds with the candidates
alternating; prints min / median ms.

    python benchmarks/kernel_micro.py --attention 2,1024,9,3,64 16,512,14,2,64
    python benchmarks/kernel_micro.py --exp 2,3,3,64,1024 --swiglu 2048,1536

An attention shape is rows,tokens,heads,kv_heads,head_dim. It imports the mlx_dpo beside it: to
time another version, copy it into a worktree of that commit and run it there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# mlx_dpo first: it preloads the fast BLAS
from mlx_dpo import cpu_kernels, kernel_choice  # noqa: E402, I001

import mlx.core as mx  # noqa: E402, I001

_normal = cpu_kernels._normal


def attention_fns(B, T, H, Hkv, D) -> dict:
    """The candidates as kernel_choice times them in a run (cpu_kernels._attention_bench:
    mlx-lm's attention and each flash block size; 64 only before the block was a choice)."""
    return cpu_kernels._attention_bench((B, H, Hkv, T, D), D**-0.5, mx.float32)


def exp_fns(shape) -> dict:
    s = _normal(shape, 0)
    m = s.max(axis=-1, keepdims=True)
    mx.eval(s, m)
    fast = mx.compile(lambda: cpu_kernels._exp(s - m))
    exact = mx.compile(lambda: mx.exp(s - m))
    return {
        "mlx_dpo exp(s - m)": lambda: mx.eval(fast()),
        "mx.exp(s - m)": lambda: mx.eval(exact()),
    }


def swiglu_fns(shape) -> dict:
    gate, x, g = (_normal(shape, i) for i in range(3))
    mx.eval(gate, x, g)
    return {
        "swiglu forward": lambda: mx.eval(cpu_kernels._swiglu_fwd(gate, x)),
        "swiglu backward": lambda: mx.eval(cpu_kernels._swiglu_bwd(gate, x, g)),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--attention", nargs="*", default=[], help="rows,tokens,heads,kv_heads,dim")
    p.add_argument("--exp", nargs="*", default=[], help="a shape, comma-separated")
    p.add_argument("--swiglu", nargs="*", default=[], help="tokens,width")
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args(argv)
    jobs = [(f"attention {a}", attention_fns, a) for a in args.attention]
    jobs += [(f"exp {a}", exp_fns, a) for a in args.exp]
    jobs += [(f"swiglu {a}", swiglu_fns, a) for a in args.swiglu]
    for title, make, text in jobs:
        dims = tuple(int(d) for d in text.split(","))
        fns = make(*dims) if make is attention_fns else make(dims)
        # kernel_choice's timing (a warm-up each, the order alternating), every round taken
        times = kernel_choice.measure(fns, rounds=args.rounds, budget_s=float("inf"))
        cells = [
            f"{k} {min(v) * 1e3:.2f}/{statistics.median(v) * 1e3:.2f}" for k, v in times.items()
        ]
        print(f"{title}: " + ", ".join(cells) + " (ms, min/median)", flush=True)


if __name__ == "__main__":
    main()
