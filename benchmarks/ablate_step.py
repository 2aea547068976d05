"""Where an update's time goes, by part of the model: the step timed with one part made free.

python benchmarks/ablate_step.py MODEL_DIR --pairs 2 --length 128 [--rounds 2] [--steps 3]
  [--no-share-prompt] [--json OUT]

A sampling profile (profile_point.py) says which functions the CPU runs, but not which part
of the model asked for them: MLX's copies, reductions and fused element-wise kernels serve
every layer alike. This times the trainer's compiled step (as grid_mlx.py does: LoRA r=8 on
q/k/v/o/gate/up/down, a cached reference, half prompt and half answer) with one part replaced
by a stand-in that costs nothing but keeps the shapes, and reports each part's cost as the
difference from the whole step:

- rope: the RoPE modules return their input;
- norms: RMSNorm returns its input;
- attention: the attention returns its queries (the kernel, and in the shared layout the
  gathers between the shared rows and each answer's own, all skipped);
- attention kernel: only the causal kernel skipped (the shared layout's gathers still run);
- swiglu: the MLP's activation returns its gate;
- optimizer: the gradients without the AdamW update.

A stand-in that dropped an input would drop the projection that made it too (MLX computes
only what the loss depends on): the attention's keys and values and the SwiGLU's up
projection are added in times 0, a reduction and one element-wise pass, so that their
GEMMs, forward and backward, still run. The numbers are wrong with a part missing; only the
times mean anything. Parts are not additive (a stand-in changes what MLX's compiler fuses
around it), and each round runs every variant in turn, the order reversed every round, so
that machine noise hits all alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mlx_dpo import _blas  # noqa: E402

_blas.preload()
import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402
from common import Geometry  # noqa: E402
from mlx_worker import (  # noqa: E402
    BIG_CACHE,
    VARIANTS,
    Step,
    load_model,
    make_batch,
    patched,
    reference_logps,
)

from mlx_dpo import cpu_kernels, shared_prompt  # noqa: E402
from mlx_dpo import model as model_lib  # noqa: E402
from mlx_dpo.config import TrainConfig  # noqa: E402


def _model_module(net):
    return sys.modules[type(net).__module__]


def _attention_stand_in(queries, keys, values, *args, **kwargs):
    # token-major, as the next reader (the transpose back to (B, T, H x D)) wants it: no copy
    out = queries.swapaxes(1, 2) + 0.0 * (keys.sum() + values.sum())
    return out.swapaxes(1, 2)


def _swiglu_stand_in(gate, x):
    return gate + 0.0 * x


def _input(self, x, *args, **kwargs):  # a module's __call__ that returns its input
    return x


def ablations(net) -> dict:
    """name -> a context in which that part of `net` costs nothing."""
    module = _model_module(net)
    rope_types = {type(m) for m in shared_prompt._rope_modules(net)}
    parts = {
        "whole step": contextlib.nullcontext,
        "rope": lambda: _all([patched(t, "__call__", _input) for t in rope_types]),
        "norms": lambda: patched(nn.RMSNorm, "__call__", _input),
        "attention": lambda: patched(module, "scaled_dot_product_attention", _attention_stand_in),
        "attention kernel": lambda: patched(cpu_kernels, "_causal_attention", _attention_stand_in),
        "swiglu": lambda: patched(module, "swiglu", _swiglu_stand_in),
        "optimizer": contextlib.nullcontext,
    }
    if not cpu_kernels.installed(net):  # mlx-lm's own attention: no kernel of ours to skip
        del parts["attention kernel"]
    return parts


@contextlib.contextmanager
def _all(contexts):
    with contextlib.ExitStack() as stack:
        for c in contexts:
            stack.enter_context(c)
        yield


def time_steps(step: Step, batch, warmup: int, steps: int, grads_only: bool) -> float:
    def run():
        if grads_only:
            mx.eval(step.grads([batch]))
        else:
            mx.eval(step.state, step([batch]))

    times = []
    for _ in range(warmup + steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return min(times[warmup:])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--no-share-prompt", action="store_true")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    mx.set_cache_limit(BIG_CACHE)
    net, _ = load_model(args.model_dir, share_prompt=not args.no_share_prompt)
    share = shared_prompt.active(net)
    cfg = TrainConfig(num_layers=-1, lora_rank=8, lora_scale=20.0, batch_size=args.pairs)
    model_lib.apply_adapters(net, cfg, seed=0)
    mx.eval(net.parameters())
    geo = Geometry(args.pairs, args.length // 2, args.length - args.length // 2)
    _, batch = make_batch(geo, net.args.vocab_size, 0, share_prompt=share)
    refs = np.array(reference_logps(net, batch)).reshape(2, -1)
    _, batch = make_batch(geo, net.args.vocab_size, 0, refs, share_prompt=share)
    parts = ablations(net)
    steps: dict[str, Step] = {}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for r in range(args.rounds):
        for name in list(parts)[:: 1 if r % 2 == 0 else -1]:
            with parts[name]():  # traced (on the first call) and run with the part replaced
                step = steps.setdefault(name, Step(net, cfg, VARIANTS["mlx_dpo"]))
                grads_only = name == "optimizer"
                times[name].append(time_steps(step, batch, args.warmup, args.steps, grads_only))
            print(f"  {name} round {r}: {times[name][-1]:.3f} s", flush=True)
    whole = min(times["whole step"])
    rows = {name: {"s": min(t), "part_s": whole - min(t)} for name, t in times.items()}
    print("| part made free | s/update | the part's cost (s) | share of the update |")
    print("|---|---|---|---|")
    for name, row in rows.items():
        share_of = row["part_s"] / whole
        print(f"| {name} | {row['s']:.3f} | {row['part_s']:.3f} | {share_of:.0%} |")
    out = {"args": vars(args), "shared_prompt": share, "parts": rows, "load": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
