"""Where one update of a small model goes: python benchmarks/profile_small.py [--spec 5m].

Runs the trainer's own compiled step (trainer.make_step through mlx_worker.Step:
trainer.batch_loss under nn.value_and_grad, compiled with the model and optimizer state, AdamW
with the trainer's clipping) on
synthetic conversational pairs of 100-250 tokens, length-bucketed and padded to 32 as
data.iterate_batches does, and reports:

  steady     min seconds per update at one fixed padded shape (after warm-up)
  new_shape  seconds of the first update at each new padded (T, C): mx.compile traces again,
             and MLX's CPU backend compiles (or loads from its on-disk cache) a C++ kernel for
             every fused graph it has not seen
  tiny       one update at a tiny shape (1 pair x 32 tokens): almost no FLOPs, so it is the
             per-update overhead (op dispatch, graph building, host round-trips)
  marginal   mean seconds per update over a stream of mixed-length updates after warm-up
             (what a real epoch sees: new shapes keep arriving)
  eval       the validation pass (trainer.evaluate) per batch
  graph      seconds to build one update's lazy graph (uncompiled, not evaluated)
  decisions  the per-kernel choices (kernel_choice)

Each variant (--kernels auto|on|off) runs in this process one after the other; run the script
twice (or with --rounds 2) to see the noise. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from mlx_dpo import _blas  # noqa: E402

_blas.preload()
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import SPECS, load_average, write_checkpoint  # noqa: E402
from mlx_worker import BIG_CACHE, VARIANTS, Step, load_model, train_config  # noqa: E402

from mlx_dpo import data, kernel_choice, trainer  # noqa: E402
from mlx_dpo import model as model_lib  # noqa: E402


def pairs_of(n: int, vocab: int, lo: int, hi: int, seed: int) -> list:
    """Conversational-looking pairs: prompt 30-60% of the row, rows lo..hi tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        total = int(rng.integers(lo, hi + 1))
        p = int(total * rng.uniform(0.3, 0.6))
        ids = lambda k: rng.integers(1, vocab, size=k).tolist()  # noqa: E731
        c, r = total - p, int(np.clip(total - p + rng.integers(-30, 31), 8, hi - p))
        out.append(data.PreferencePair(ids(p), ids(c), ids(r), source="synthetic", prompt=""))
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def graph_build_s(step, batch, repeats: int) -> float:
    """Seconds to build one update's lazy graph, uncompiled and not evaluated: the Python side
    of per-op dispatch (each op's C++ node, nn.Module calls, the kernels' Python loops)."""
    from dataclasses import replace

    eager = Step(step.model, step.cfg, replace(VARIANTS["mlx_dpo"], compile=False))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = eager([batch])
        best = min(best, time.perf_counter() - t0)
        mx.eval(eager.state, out)  # not timed: the compute
    return best


def profile(args, model_dir: Path, kernels: str) -> dict:
    kernel_choice.reset(
        kernel_choice.Chooser(
            kernel_choice.default_cache_path(),
            kernel_choice.parse_override({"auto": "", "on": "all=on", "off": "all=off"}[kernels]),
        )
    )
    net, _ = load_model(str(model_dir))
    cfg = train_config(args)
    model_lib.apply_adapters(net, cfg, seed=0)
    mx.eval(net.parameters())
    vocab = net.args.vocab_size
    pairs = pairs_of(args.pairs_total, vocab, 100, 250, args.seed)
    refs = np.zeros((2, len(pairs)), dtype=np.float32)
    stream = data.iterate_batches(pairs, args.pairs, ref_chosen=refs[0], ref_rejected=refs[1])
    updates = [next(stream) for _ in range(args.updates)]
    step = Step(net, cfg, VARIANTS["mlx_dpo"])

    def run(batch):
        mx.eval(step.state, step([batch]))

    out: dict = {"kernels": kernels, "new_shape": {}, "shapes": []}
    seen_shapes = set()
    stream_times = []
    for u in updates:
        b = u.micro_batches[0]
        shape = (b.tokens.shape[1], b.positions.shape[1])
        cpu0 = time.process_time()
        t = timed(lambda b=b: run(b))
        if shape not in seen_shapes:
            out.setdefault("new_shape_cpu", {})[f"T{shape[0]} C{shape[1]}"] = (
                time.process_time() - cpu0
            )
            seen_shapes.add(shape)
            out["new_shape"][f"T{shape[0]} C{shape[1]}"] = t
        stream_times.append(t)
    out["shapes"] = len(seen_shapes)
    warm = args.updates // 2  # the second half of the stream, after most shapes were seen
    out["marginal_s"] = float(np.mean(stream_times[warm:]))
    out["marginal_new_shapes"] = sum(
        1 for i, u in enumerate(updates) if i >= warm and timed_first(updates, i)
    )
    # steady state at the most common shape
    b = updates[-1].micro_batches[0]
    out["steady_s"] = min(timed(lambda: run(b)) for _ in range(args.repeats))
    tiny = data.collate(pairs_of(1, vocab, 24, 30, 1), ref_chosen=[0.0], ref_rejected=[0.0])
    run(tiny)
    out["tiny_s"] = min(timed(lambda: run(tiny)) for _ in range(args.repeats))
    out["graph_build_s"] = graph_build_s(step, b, args.repeats)
    valid = pairs[: 4 * args.pairs]
    vrefs = (np.zeros(len(valid), np.float32), np.zeros(len(valid), np.float32))
    trainer.evaluate(net, valid, vrefs, cfg)
    out["eval_per_batch_s"] = min(
        timed(lambda: trainer.evaluate(net, valid, vrefs, cfg)) for _ in range(2)
    ) / (len(valid) / args.pairs)
    out["decisions"] = [d.line() for d in kernel_choice.chooser().decisions.values()]
    return out


def timed_first(updates, i) -> bool:
    shape = lambda u: tuple(u.micro_batches[0].tokens.shape)  # noqa: E731
    return all(shape(updates[j]) != shape(updates[i]) for j in range(i))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="5m", choices=sorted(SPECS))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--pairs-total", type=int, default=64)
    p.add_argument("--updates", type=int, default=24)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kernels", nargs="+", default=["auto", "off", "on"])
    p.add_argument("--json", help="write the result here too")
    args = p.parse_args(argv)
    mx.set_cache_limit(BIG_CACHE)
    report = {"spec": args.spec, "load_average_before": load_average(), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_checkpoint(Path(tmp) / "m", SPECS[args.spec])
        for k in args.kernels:
            report["runs"].append(profile(args, model_dir, k))
            print(json.dumps(report["runs"][-1]), flush=True)
    report["load_average_after"] = load_average()
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
