#!/usr/bin/env python
"""Measure the peak memory of the trainer's compiled step over a grid of shapes and compare it
with mlx_dpo.memory.plan; --fit re-fits the planner's factors (mlx_dpo.memory_factors; needs
scipy).

    python benchmarks/memory_calibration.py                 # the quick grid, prints the errors
    python benchmarks/memory_calibration.py --grid full --fit --json out.jsonl

Peaks are mx.get_peak_memory() of one update after a warm-up one, minus the live memory before
it (weights, adapters, optimizer state): the "working" memory the factors describe. The total
(plus weights) is what tests/test_memory.py checks.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import mlx.core as mx  # noqa: E402
import mlx_worker as W  # noqa: E402  (imports mlx_dpo first: the BLAS preload)
import numpy as np  # noqa: E402
from common import Geometry, Spec, write_checkpoint  # noqa: E402

from mlx_dpo import cpu_kernels, kernel_choice, memory, memory_factors  # noqa: E402
from mlx_dpo import model as model_lib  # noqa: E402

G = Geometry
# (spec, geometries, log-prob paths, quantize)
QUICK = [
    (Spec(256, 4, 4, 2, 704, 8192), [G(1, 64, 64), G(2, 128, 128)], ("lean",), None),
    (Spec(512, 8, 8, 2, 1408, 32000), [G(2, 128, 128)], ("lean",), None),
    (Spec(128, 2, 4, 2, 384, 32000), [G(1, 64, 64), G(4, 64, 64)], ("lean",), None),
]
FULL = QUICK + [
    (Spec(128, 1, 2, 1, 352, 1024), [G(1, 64, 64), G(2, 64, 64), G(1, 256, 256)], ("lean",), None),
    (Spec(256, 2, 4, 2, 1408, 1024), [G(2, 64, 64), G(2, 128, 128)], ("lean",), None),
    (Spec(256, 2, 8, 2, 704, 1024), [G(2, 64, 64), G(2, 128, 128)], ("lean",), None),
    (Spec(384, 2, 6, 3, 1024, 1024), [G(1, 64, 64), G(1, 256, 256)], ("lean",), None),
    (
        Spec(512, 2, 8, 2, 1408, 1024),
        [G(2, 128, 128), G(1, 512, 512), G(1, 1024, 1024)],
        ("lean",),
        None,
    ),
    (Spec(768, 2, 12, 2, 2048, 1024), [G(2, 128, 128), G(1, 256, 256)], ("lean",), None),
    (Spec(256, 6, 4, 4, 704, 1024), [G(2, 64, 64), G(2, 128, 128)], ("lean",), None),
    (Spec(128, 2, 2, 1, 352, 151936), [G(1, 64, 64), G(2, 128, 128)], ("lean",), None),
    (Spec(512, 8, 8, 2, 1408, 151936), [G(2, 128, 128)], ("lean",), None),
    (Spec(256, 4, 4, 2, 704, 8192), [G(1, 64, 64), G(2, 128, 128)], ("plain",), None),
    (Spec(256, 4, 4, 2, 704, 8192), [G(1, 64, 64), G(2, 128, 128)], ("lean",), 4),
    (Spec(512, 8, 8, 2, 1408, 32000), [G(2, 128, 128)], ("lean",), 4),
]


def measure(spec: Spec, geos, paths, quantize) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, spec)
        net, _ = W.load_model(tmp, quantize)
    adapted = False
    for geo in geos:
        cfg = W.train_config(argparse.Namespace(lora_rank=8, lora_scale=20.0, pairs=geo.pairs))
        for ckpt in (False, True):
            plan = memory.plan(
                net,
                replace(cfg, grad_checkpoint=ckpt),
                geo.row_tokens,
                geo.rows,
                completion_tokens_per_row=geo.completion_len,
                lean=paths[0] == "lean",
            )
            if not adapted:
                model_lib.apply_adapters(net, cfg)
                mx.eval(net.parameters())
                adapted = True
            _, batch = W.make_batch(geo, spec.vocab_size, 0, refs=np.zeros((2, geo.pairs)))
            variant = W.Variant("x", ckpt=ckpt, logps=paths[0])
            with W.variant_context(variant, net):
                step = W.Step(net, cfg, variant)  # trainer.make_step with its own AdamW

                def update(step=step, batch=batch):
                    mx.eval(step.state, step([batch]))

                update()
                gc.collect()
                mx.clear_cache()
                base = mx.get_active_memory()
                mx.reset_peak_memory()
                update()
                peak = mx.get_peak_memory()
            fixed = plan.parts["weights"] + plan.parts["adapters + optimizer"]
            out.append(
                {
                    "spec": vars(spec),
                    "rows": geo.rows,
                    "T": int(batch.tokens.shape[1]),
                    "C": int(batch.positions.shape[1]),
                    "ckpt": ckpt,
                    "logps": paths[0],
                    "quantize": quantize,
                    "measured_peak_mb": peak / 2**20,
                    "measured_above_mb": (peak - base) / 2**20,
                    "planned_mb": plan.total_bytes / 2**20,
                    "planned_above_mb": (plan.total_bytes - fixed) / 2**20,
                }
            )
            r = out[-1]
            print(
                f"d={spec.hidden_size} L={spec.num_hidden_layers} V={spec.vocab_size} "
                f"rows={geo.rows} T={r['T']} ckpt={ckpt} {paths[0]} q={quantize}: measured "
                f"{r['measured_peak_mb']:.0f} MB ({r['measured_above_mb']:.0f} above), planned "
                f"{r['planned_mb']:.0f} ({r['planned_above_mb']:.0f}): total x"
                f"{r['planned_mb'] / r['measured_peak_mb']:.2f}, above x"
                f"{r['planned_above_mb'] / r['measured_above_mb']:.2f}",
                flush=True,
            )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=["quick", "full"], default="quick")
    p.add_argument("--json", help="write one JSON line per measurement")
    p.add_argument("--fit", action="store_true", help="re-fit the factors (needs scipy)")
    args = p.parse_args(argv)
    mx.set_cache_limit(W.BIG_CACHE)
    # the factors describe a fixed set of kernels: every CPU kernel on (where they run), not
    # the per-shape choice a run makes
    kernel_choice.reset(kernel_choice.Chooser(None, kernel_choice.parse_override("all=on")))
    rows = []
    for spec, geos, paths, quantize in QUICK if args.grid == "quick" else FULL:
        rows += measure(spec, geos, paths, quantize)
        gc.collect()
        mx.clear_cache()
    total = np.array([r["planned_mb"] / r["measured_peak_mb"] - 1 for r in rows])
    above = np.array([r["planned_above_mb"] / r["measured_above_mb"] - 1 for r in rows])
    print(
        f"\n{len(rows)} configurations: total planned/measured - 1: median {np.median(abs(total)):.1%}, "
        f"max {abs(total).max():.1%}; working memory: median {np.median(abs(above)):.1%}, "
        f"max {abs(above).max():.1%}"
    )
    if args.json:
        Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    if args.fit:
        print(json.dumps(fit(rows), indent=1))


KEYS = ("qkv", "inter", "hidden", "scores")
# the kernels each factor set was measured with (every CPU kernel on, or MLX's ops)
KERNELS = {"fast": {"attention": "flash", "head": "exp"}, "default": {}}


def arch_of(spec: dict, quantized: bool) -> memory_factors.Arch:
    s = Spec(**spec)
    shapes = s.linear_shapes().values()
    return memory_factors.Arch(
        blocks=s.num_hidden_layers,
        hidden=s.hidden_size,
        qkv=s.linear_shapes()["self_attn.q_proj"][1] + 2 * s.linear_shapes()["self_attn.k_proj"][1],
        inter=s.intermediate_size,
        heads=s.num_attention_heads,
        vocab=s.vocab_size,
        adapted=[(i, a, b) for i in range(s.num_hidden_layers) for a, b in shapes],
        block_linear_params=sum(a * b for a, b in shapes),
        quantized=quantized,
    )


def fit(rows: list[dict]) -> dict:
    """Least-squares (relative error) factors per checkpointing mode, for the mode this
    process runs in (default or fast CPU kernels), from the lean fp32 measurements."""
    from scipy.optimize import least_squares

    mode = "fast" if cpu_kernels.enabled() else "default"
    table = memory_factors.FACTORS[mode]
    out = {}
    for ckpt in (False, True):
        sel = [r for r in rows if r["ckpt"] == ckpt and r["logps"] == "lean" and not r["quantize"]]
        if not sel:
            continue
        y = np.array([r["measured_above_mb"] for r in sel]) * 2**20

        def residuals(p, sel=sel, y=y, ckpt=ckpt):
            table["saved"][ckpt] = dict(zip(KEYS, p[0:4], strict=True))
            table["retained"][ckpt] = dict(zip(KEYS, p[4:8], strict=True))
            table["layer"][ckpt] = dict(zip(KEYS, p[8:12], strict=True))
            table["head"][ckpt] = {"tiles": p[12], "hidden": p[13]}
            pred = []
            for r in sel:
                a = arch_of(r["spec"], False)
                lora = sum(8 * (i + o) for _, i, o in a.adapted)
                parts, _ = memory_factors.estimate(
                    a, rows=r["rows"], T=r["T"], C=r["C"], ckpt=ckpt, lean=True, act=4,
                    lora_params=lora, n_states=2, weights=0, **KERNELS[mode],
                )  # fmt: skip
                pred.append(sum(parts.values()) - 4 * lora * 3)  # above weights/adapters/state
            return np.array(pred) / y - 1

        best = None
        for seed in range(6):
            p0 = np.random.default_rng(seed).uniform(0.2, 4, 14)
            r = least_squares(residuals, p0, bounds=(0, 60))
            if best is None or np.abs(r.fun).max() < np.abs(best.fun).max():
                best = r
        residuals(best.x)
        out[str(ckpt)] = {
            "max_rel_err": float(np.abs(best.fun).max()),
            "median_rel_err": float(np.median(np.abs(best.fun))),
            "factors": {k: table[k][ckpt] for k in ("saved", "retained", "layer", "head")},
        }
    return {"mode": mode, **out}


if __name__ == "__main__":
    main()
