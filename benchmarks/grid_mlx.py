"""One grid point, one variant, mlx_dpo side: run by grid.py in its own process.

python benchmarks/grid_mlx.py MODEL_DIR --pairs B --length T [--quantize 4] [--kernels SPEC]
  [--lora-keys KEY ...] [--grad-checkpoint] [--plan-only] [--warmup 2] [--steps 3] --json OUT

Loads the checkpoint as `mlx_dpo train` does (set_compute_path: float32 compute on the CPU, the
kernels chosen per shape class unless --kernels overrides), inserts LoRA r=8 on q/k/v/o/gate/
up/down of every block (--lora-keys: on those only, to time what the adapters cost; with
--grad-checkpoint each block recomputed in the backward, as `mlx_dpo train` does; turned on
when the memory plan does not fit the machine without it, as train's refusal offers), builds B
synthetic pairs of T tokens (half prompt, half completion), runs the trainer's compiled step
(trainer.make_step, through mlx_worker.Step) with a cached reference and writes: the
marginal seconds per update after warm-up (min and median of --steps), the reference forward's
pairs/s, the memory plan's parts and the measured peaks (MLX allocator, process RSS);
--plan-only writes the plan alone (with --kernels forced, nothing is timed: seconds a point).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mlx_dpo import _blas  # noqa: E402

_blas.preload()
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import Geometry  # noqa: E402
from mlx_worker import BIG_CACHE, VARIANTS, Step, load_model, make_batch  # noqa: E402

from mlx_dpo import kernel_choice, memory, shared_prompt  # noqa: E402
from mlx_dpo import model as model_lib  # noqa: E402
from mlx_dpo.config import TrainConfig  # noqa: E402
from mlx_dpo.config_values import ConfigError  # noqa: E402


def rss_now() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def fit_or_checkpoint(net, cfg, pairs, available: int | None = None):
    """(cfg, plan, note) as `mlx_dpo train` would run the point: when the plan does not fit
    `available` (default: this machine's), with --grad-checkpoint, the change its refusal
    offers that keeps the point's batch and length; note is the refusal, None when none.
    Raises ConfigError when that does not fit either."""
    plan = memory.plan_for_pairs(net, cfg, pairs)  # as `mlx_dpo train` plans (and picks kernels)
    try:
        memory.check_fits(plan, available)
        return cfg, plan, None
    except ConfigError as e:
        if cfg.grad_checkpoint:
            raise
        note = str(e)
    cfg = dataclasses.replace(cfg, grad_checkpoint=True)
    model_lib.enable_grad_checkpoint(net)
    plan = memory.plan_for_pairs(net, cfg, pairs)
    memory.check_fits(plan, available)
    return cfg, plan, note


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("model_dir")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--quantize", type=int, default=None)
    p.add_argument("--kernels", default="", help="MLX_DPO_KERNELS value (default: measured)")
    p.add_argument(
        "--no-share-prompt", action="store_true", help="two rows per pair (mlx_dpo train's flag)"
    )
    p.add_argument(
        "--prompt-len", type=int, default=None, help="prompt tokens of each pair (default: half)"
    )
    p.add_argument(
        "--lora-keys", nargs="+", default=None,
        help="adapt only these projections (default: all seven, as the other sides do)",
    )  # fmt: skip
    p.add_argument("--grad-checkpoint", action="store_true", help="mlx_dpo train's flag")
    p.add_argument(
        "--available", type=int, default=None,
        help="bytes the plan must fit (default: this machine's, as mlx_dpo train checks)",
    )  # fmt: skip
    p.add_argument(
        "--plan-only", action="store_true",
        help="write the memory plan and stop before the reference pass and the steps",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    kernel_choice.reset(
        kernel_choice.Chooser(
            kernel_choice.default_cache_path(), kernel_choice.parse_override(args.kernels)
        )
    )
    mx.set_cache_limit(BIG_CACHE)  # as run.py does on the CPU
    t0 = time.perf_counter()
    net, notes = load_model(args.model_dir, args.quantize, share_prompt=not args.no_share_prompt)
    share = shared_prompt.active(net)
    out = {"load_s": time.perf_counter() - t0, "rss_loaded": rss_now(), "notes": notes}
    cfg = TrainConfig(
        num_layers=-1, lora_rank=8, lora_scale=20.0, batch_size=args.pairs,
        lora_keys=args.lora_keys, grad_checkpoint=args.grad_checkpoint,
    )  # fmt: skip
    out["trainable_parameters"] = model_lib.apply_adapters(net, cfg, seed=0)
    if args.grad_checkpoint:
        model_lib.enable_grad_checkpoint(net)
    mx.eval(net.parameters())
    prompt = args.length // 2 if args.prompt_len is None else args.prompt_len
    geo = Geometry(args.pairs, prompt, args.length - prompt)
    vocab = net.args.vocab_size
    pairs, _ = make_batch(geo, vocab, 0)
    try:
        cfg, plan, refused = fit_or_checkpoint(net, cfg, pairs, args.available)
    except ConfigError as e:
        sys.exit(f"grid_mlx: does not fit, with --grad-checkpoint either: {e}")
    out["grad_checkpoint"] = cfg.grad_checkpoint
    out["refused_without_checkpoint"] = refused
    out["plan"] = {
        "total": plan.resident_bytes,
        "arrays": plan.total_bytes,
        "parts": {**plan.parts, **plan.os_parts},
        "notes": plan.notes,
        "peak_so_far": plan.peak_so_far,
    }
    if args.plan_only:  # what the planner says at this point (RESULTS.md 1r re-plans the grid)
        out["decisions"] = [d.line() for d in kernel_choice.chooser().decisions.values()]
        Path(args.json).write_text(json.dumps(out, indent=1))
        return out
    _, batch = make_batch(geo, vocab, 0, share_prompt=share)
    from mlx_worker import reference_logps

    ref_times = []
    for _ in range(2):
        t = time.perf_counter()
        refs = reference_logps(net, batch)
        mx.eval(refs)
        ref_times.append(time.perf_counter() - t)
    out["reference_pairs_per_s"] = args.pairs / min(ref_times)
    refs = np.array(refs).reshape(2, -1)
    _, batch = make_batch(geo, vocab, 0, refs, share_prompt=share)
    step = Step(net, cfg, VARIANTS["mlx_dpo"])  # trainer.make_step with its own AdamW

    def run():
        mx.eval(step.state, step([batch]))

    times = []
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    marginal = times[args.warmup :]
    out.update(
        step_s_min=min(marginal),
        step_s_median=float(np.median(marginal)),
        first_step_s=times[0],
        step_times=times,
        peak_mlx_bytes=mx.get_peak_memory(),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        decisions=[d.line() for d in kernel_choice.chooser().decisions.values()],
        load_average=list(os.getloadavg()),
    )
    Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
