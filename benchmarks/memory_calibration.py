#!/usr/bin/env python
"""Measure the peak memory of the trainer's compiled step over a grid of shapes and compare it
with mlx_dpo.memory.plan; --fit re-fits the planner's factors (mlx_dpo.memory_factors; needs
scipy).

    python benchmarks/memory_calibration.py                 # the quick grid, prints the errors
    python benchmarks/memory_calibration.py --grid full --fit --json out.jsonl
    python benchmarks/memory_calibration.py --grid depth   # full's deep models at 2 blocks, and more
    python benchmarks/memory_calibration.py --grid deep --layouts shared --checkpointing off

Each geometry runs in both layouts (`--layouts rows shared`: two rows per pair, and the shared
prompt's one row), with every CPU kernel on (`--kernels all=on`, the fused LoRA adapters and
SwiGLU included). The fit reads the blocks' factors off those runs, the extra of mlx-lm's
adapters off runs with `--kernels all=on,lora=off` and the extra of MLX's SwiGLU off runs with
`all=on,swiglu=off` (`--measured a.jsonl b.jsonl --fit` fits what earlier runs wrote). Without
checkpointing it also fits the slope of each pair of steps that differ in depth alone (`--grid
depth` holds the full grid's deep models at 2 blocks): the per-block factors, which the many
1-2 block steps cannot tell from one block's working set.
`--part K/N` runs every N-th configuration from K, to spread a full grid over processes.
MLX's own operations' factors (Metal, CUDA, arm CPUs, a step without the kernels) are fitted
the same way with the kernels opted out (RESULTS.md section 1t):

    MLX_DPO_NO_FAST_EXP=1 python benchmarks/memory_calibration.py --grid full --fit --kernels all=off --json off.jsonl

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
    # deep models, for the fit to tell the per-block factors from the constant ones: fitted on
    # 1-8 blocks alone they planned 30 blocks ~10% high (RESULTS.md 1q), with these too still
    # 11% (1r); with their 2-block twins (DEPTH) and the fit's slopes, within 2% (1s)
    (Spec(576, 16, 9, 3, 1536, 8192), [G(1, 128, 128)], ("lean",), None),
    (Spec(256, 12, 4, 2, 704, 8192), [G(2, 64, 64)], ("lean",), None),
    (Spec(896, 8, 14, 2, 4864, 8192), [G(1, 128, 128)], ("lean",), None),
    (Spec(384, 24, 6, 2, 1024, 4096), [G(1, 64, 64)], ("lean",), None),
]
# The per-block factors against the constant ones, which the FULL grid's 1-8 block models
# barely tell apart (RESULTS.md sections 1q, 1s): each of FULL's deep models again at 2 blocks
# (the fit compares each depth pair's slope), and SmolLM2-135M's width at 2, 8 and 16 blocks.
DEPTH = [
    (replace(spec, num_hidden_layers=2), geos, paths, quantize)
    for spec, geos, paths, quantize in FULL
    if spec.num_hidden_layers >= 8 and quantize is None
] + [
    (Spec(576, blocks, 9, 3, 1536, 8192), [G(2, 256, 256)], ("lean",), None)
    for blocks in (2, 8, 16)
]
# SmolLM2-135M's 30 blocks (a small vocabulary) at 767-6,140 tokens a step: the per-block
# factors at the grid's depth, short rows and long (RESULTS.md section 1r; --checkpointing off)
DEEP = [
    (
        Spec(576, 30, 9, 3, 1536, 8192),
        [G(1, 256, 256), G(2, 256, 256), G(2, 512, 512), G(4, 512, 512)],
        ("lean",),
        None,
    )
]
GRIDS = {"quick": QUICK, "full": FULL, "depth": DEPTH, "deep": DEEP}


def measure(
    spec: Spec, geos, paths, quantize, shared: bool = False, ckpts=(False, True)
) -> list[dict]:
    """Planned and measured peaks of one update per geometry, with and/or without
    checkpointing (`ckpts`), in the two-row layout or (`shared`) the shared-prompt one (one row per pair through the
    blocks: what a run of pairs with a common prompt trains with)."""
    out = []
    # the kernels the steps run: with them opted out MLX's, whatever --kernels says (the
    # "default" factors take the fused ones' extras off)
    ran = kernel_choice.chooser().override if cpu_kernels.enabled() else {}
    with tempfile.TemporaryDirectory() as tmp:
        write_checkpoint(tmp, spec)
        net, _ = W.load_model(tmp, quantize, share_prompt=shared)
    adapted = False
    for geo in geos:
        cfg = W.train_config(argparse.Namespace(lora_rank=8, lora_scale=20.0, pairs=geo.pairs))
        # the blocks' row: prompt + both answers when shared; attention runs each answer's own
        length = geo.prompt_len + 2 * geo.completion_len if shared else geo.row_tokens
        for ckpt in ckpts:
            plan = memory.plan(
                net,
                replace(cfg, grad_checkpoint=ckpt),
                length,
                geo.rows,
                completion_tokens_per_row=geo.completion_len,
                lean=paths[0] == "lean",
                shared=shared,
                attention_tokens_per_row=geo.row_tokens,
            )
            if not adapted:
                model_lib.apply_adapters(net, cfg)
                mx.eval(net.parameters())
                adapted = True
            _, batch = W.make_batch(
                geo, spec.vocab_size, 0, refs=np.zeros((2, geo.pairs)), share_prompt=shared
            )
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
                    "T": plan.tokens_per_row,
                    "C": int(batch.positions.shape[1]),
                    "T_att": memory._padded(geo.row_tokens),
                    "shared": shared,
                    "lora": ran.get("lora", "mlx"),
                    "swiglu": ran.get("swiglu", "mlx"),
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
                f"rows={geo.rows} T={r['T']} shared={shared} lora={r['lora']} "
                f"swiglu={r['swiglu']} ckpt={ckpt} "
                f"{paths[0]} q={quantize}: measured "
                f"{r['measured_peak_mb']:.0f} MB ({r['measured_above_mb']:.0f} above), planned "
                f"{r['planned_mb']:.0f} ({r['planned_above_mb']:.0f}): total x"
                f"{r['planned_mb'] / r['measured_peak_mb']:.2f}, above x"
                f"{r['planned_above_mb'] / r['measured_above_mb']:.2f}",
                flush=True,
            )
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", choices=list(GRIDS), default="quick")
    p.add_argument("--json", help="write one JSON line per measurement")
    p.add_argument(
        "--fit", action="store_true", help="re-fit the factors (needs scipy; lean fp32 only)"
    )
    p.add_argument(
        "--layouts",
        nargs="+",
        choices=["rows", "shared"],
        default=["rows", "shared"],
        help="two rows per pair, and/or the shared-prompt layout's one",
    )
    p.add_argument("--kernels", default="all=on", help="MLX_DPO_KERNELS-style override")
    p.add_argument("--part", default="0/1", help="K/N: only every N-th configuration, from K")
    p.add_argument(
        "--checkpointing", choices=["both", "off", "on"], default="both",
        help="measure each step without and/or with --grad-checkpoint",
    )  # fmt: skip
    p.add_argument("--measured", nargs="+", help="--json files to read instead of measuring")
    args = p.parse_args(argv)
    mx.set_cache_limit(W.BIG_CACHE)
    # the factors describe a fixed set of kernels: every CPU kernel on (where they run), not
    # the per-shape choice a run makes
    kernel_choice.reset(kernel_choice.Chooser(None, kernel_choice.parse_override(args.kernels)))
    k, n = map(int, args.part.split("/"))
    items = [
        (spec, [geo], paths, quantize, layout == "shared")
        for spec, geos, paths, quantize in GRIDS[args.grid]
        for geo in geos
        for layout in args.layouts
        if not args.fit or (paths == ("lean",) and quantize is None)  # what the fit reads
    ][k::n]
    rows = [json.loads(line) for f in args.measured or [] for line in open(f)]
    ckpts = {"both": (False, True), "off": (False,), "on": (True,)}[args.checkpointing]
    for spec, geos, paths, quantize, shared in [] if args.measured else items:
        rows += measure(spec, geos, paths, quantize, shared, ckpts)
        gc.collect()
        mx.clear_cache()
        if args.json:  # as it goes: a long calibration keeps what it measured
            Path(args.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    total = np.array([r["planned_mb"] / r["measured_peak_mb"] - 1 for r in rows])
    above = np.array([r["planned_above_mb"] / r["measured_above_mb"] - 1 for r in rows])
    print(
        f"\n{len(rows)} configurations: total planned/measured - 1: median {np.median(abs(total)):.1%}, "
        f"max {abs(total).max():.1%}; working memory: median {np.median(abs(above)):.1%}, "
        f"max {abs(above).max():.1%}"
    )
    if args.fit:
        print(json.dumps(fit(rows), indent=1))
        summary(rows)


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
    """Factors per checkpointing mode, for the mode this process runs in (default or fast CPU
    kernels), from the lean fp32 measurements. With the CPU kernels the blocks' factors come
    from the runs with every kernel on, over both layouts; then the extra of mlx-lm's adapters
    from the runs with `--kernels all=on,lora=off` and the extra of MLX's SwiGLU from those
    with `all=on,swiglu=off`."""
    mode = "fast" if cpu_kernels.enabled() else "default"
    table = memory_factors.FACTORS[mode]
    out = {}
    for ckpt in (False, True):
        sel = [r for r in rows if r["ckpt"] == ckpt and r["logps"] == "lean" and not r["quantize"]]
        fused = [r for r in sel if _kernels(r) == ("fused", "fused")] if mode == "fast" else sel
        if not fused:
            continue

        def blocks(p, ckpt=ckpt):
            table["saved"][ckpt] = dict(zip(KEYS, p[0:4], strict=True))
            table["retained"][ckpt] = dict(zip(KEYS, p[4:8], strict=True))
            table["layer"][ckpt] = dict(zip(KEYS, p[8:12], strict=True))
            table["head"][ckpt] = {"tiles": p[12], "hidden": p[13]}

        now = [table[k][ckpt][x] for k in ("saved", "retained", "layer") for x in KEYS]
        now += [table["head"][ckpt][x] for x in ("tiles", "hidden")]
        # with checkpointing a block keeps at least its input, one hidden-wide fp32 tensor per
        # token: unbounded, the fit put that on the other widths (their steps scale alike)
        low = np.zeros(len(now))
        low[KEYS.index("hidden")] = 1.0 if ckpt else 0.0  # saved's hidden: now's third
        out[str(ckpt)] = _least_squares(blocks, now, fused, ckpt, mode, slopes=not ckpt, low=low)
        out[str(ckpt)]["factors"] = {
            k: table[k][ckpt] for k in ("saved", "retained", "layer", "head")
        }
        if mode != "fast":
            continue
        extras = {
            "mlx-lm adapters": (("mlx", "fused"), memory_factors._ADAPTER_EXTRA[ckpt]),
            "MLX's SwiGLU": (("fused", "mlx"), memory_factors._SWIGLU_EXTRA[ckpt]),
        }
        for name, (kernels, extra) in extras.items():
            measured = [r for r in sel if _kernels(r) == kernels]
            if not measured:
                continue

            def set_extra(p, extra=extra):
                extra.update(saved=p[0], layer=p[1])

            now = [extra["saved"], extra["layer"]]
            out[f"{ckpt} {name}"] = _least_squares(
                set_extra, now, measured, ckpt, mode, slopes=not ckpt
            )
            out[f"{ckpt} {name}"]["factors"] = dict(extra)
    return {"mode": mode, **out}


def _kernels(r: dict) -> tuple[str, str]:
    """A measurement's (LoRA call, SwiGLU)."""
    return r.get("lora", "mlx"), r.get("swiglu", "mlx")


UNDER_WEIGHT = 2.0  # an underestimate costs twice an overestimate: it can run out of memory
# Weight of a depth pair's slope error against one step's error. The 1-2 block steps outnumber
# the deep ones ~10 to 1, and at their depth a block's factors and one block's working set
# scale alike: the slopes pin the per-block factors (RESULTS.md 1s). Without checkpointing
# alone: there MLX's peak grows by the same bytes with each block from 2 to 30 (15 pairs, 1%),
# with it not (SmolLM2-135M's width: 14.8 MB a block from 2 to 8, 9.3 from 2 to 16), so a
# 2-block step peaks elsewhere in the update than a deep one.
SLOPE_WEIGHT = 3.0


def _least_squares(
    set_params, now: list, sel: list[dict], ckpt: bool, mode: str, slopes: bool = True, low=0.0
) -> dict:
    """Fit the parameters (set into the tables by `set_params`; `now` their current values)
    to the working memory of `sel` by least squares on the relative error of each step and
    (with `slopes`, SLOPE_WEIGHT) of each depth pair's difference, underestimates weighted
    UNDER_WEIGHT, each parameter between `low` and 60; the best by its largest step error of
    7 starts: the current values and 6 random ones (with 14 factors, some near-collinear, one
    start can end far from the best). Leaves the best parameters set."""
    from scipy.optimize import least_squares

    y = np.array([r["measured_above_mb"] for r in sel]) * 2**20
    pairs = np.array(_depth_pairs(sel) if slopes else [], dtype=int).reshape(-1, 2)
    pairs = pairs[y[pairs[:, 1]] > y[pairs[:, 0]]]  # a slope only where the peak grew
    dy = y[pairs[:, 1]] - y[pairs[:, 0]]

    n = len(sel)  # the steps' errors come first, then the pairs'

    def errors(p):
        set_params(p)
        pred = np.array([_predicted_above(r, ckpt, mode) for r in sel])
        return np.concatenate([pred / y - 1, (pred[pairs[:, 1]] - pred[pairs[:, 0]]) / dy - 1])

    def residuals(p):
        err = errors(p)
        err = np.where(err < 0, UNDER_WEIGHT * err, err)
        err[n:] *= SLOPE_WEIGHT
        return err

    best = None
    starts = [np.clip(now, low, 60)] + [
        np.maximum(np.random.default_rng(s).uniform(0.2, 4, len(now)), low) for s in range(6)
    ]
    for p0 in starts:
        # the parts are whole bytes: a default finite-difference step (1e-8 of a factor) moves
        # them by less than one, and the fit stopped where it started
        r = least_squares(residuals, p0, bounds=(low, 60), diff_step=1e-3)
        if best is None or np.abs(r.fun[:n]).max() < np.abs(best.fun[:n]).max():
            best = r
    err = errors(best.x)
    return {
        "n": n,
        "max_over": float(err[:n].max()),
        "max_under": float(-err[:n].min()),
        "median_abs_err": float(np.median(np.abs(err[:n]))),
        "depth_pairs": len(pairs),
        "slope_err": [float(err[n:].min(initial=0)), float(err[n:].max(initial=0))],
    }


def _depth_pairs(sel: list[dict]) -> list[tuple[int, int]]:
    """Indices (shallow, deep) of the steps in `sel` that differ in their number of blocks
    alone: each against the shallowest of its kind."""
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for i, r in enumerate(sel):
        s = Spec(**r["spec"])
        step = (r["rows"], r["T"], r["C"], r.get("T_att"), r.get("shared", False), r["ckpt"])
        key = (replace(s, num_hidden_layers=0), step, _kernels(r), r["logps"], r["quantize"])
        groups.setdefault(key, []).append((s.num_hidden_layers, i))
    pairs = []
    for steps in groups.values():
        (low, first), *rest = sorted(steps)
        pairs += [(first, i) for blocks, i in rest if blocks > low]
    return pairs


def summary(rows: list[dict]) -> None:
    """Planned (by the fitted factors) / measured peak, by adapters, layout and checkpointing."""
    mode = "fast" if cpu_kernels.enabled() else "default"
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        above = _predicted_above(r, r["ckpt"], mode) / 2**20
        total = r["measured_peak_mb"] - r["measured_above_mb"] + above
        key = (*_kernels(r), "shared" if r.get("shared") else "rows", r["ckpt"])
        groups.setdefault(key, []).append(total / r["measured_peak_mb"])
    for (lora, swiglu, layout, ckpt), ratios in sorted(groups.items()):
        print(
            f"lora={lora} swiglu={swiglu} {layout} ckpt={ckpt} ({len(ratios)}): "
            "planned/measured peak "
            f"{min(ratios):.2f}-{max(ratios):.2f}, median {np.median(ratios):.2f}"
        )


def _predicted_above(r: dict, ckpt: bool, mode: str) -> float:
    """The estimate's bytes above the weights, adapters and optimizer state for row `r`."""
    a = arch_of(r["spec"], False)
    lora = sum(8 * (i + o) for _, i, o in a.adapted)
    parts, _ = memory_factors.estimate(
        a, rows=r["rows"], T=r["T"], C=r["C"], ckpt=ckpt, lean=True, act=4, lora_params=lora,
        n_states=2, weights=0, shared=r.get("shared", False), T_att=r.get("T_att"),
        lora=r.get("lora", "mlx"), swiglu=r.get("swiglu", "mlx"), **KERNELS[mode],
    )  # fmt: skip
    return sum(parts.values()) - 4 * lora * 3


if __name__ == "__main__":
    main()
