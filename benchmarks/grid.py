"""The benchmark grid: python benchmarks/grid.py [--quick] (see --help).

Models (random weights, real configurations; see common.SPECS): the demo model (mlx_dpo/demo,
a 4-bit Llama), 5M Qwen2-style (head dim 32), the 40M one, SmolLM2-135M (full depth: 30 layers)
and Qwen2.5-0.5B (--qwen-layers of its 24 blocks; default 2, where time is short). Sequence
lengths 128/512/1024 (half prompt, half completion), batch 1/2/8 pairs, fp32 and 4-bit.
Variants per point, each in its own process, alternating in --rounds rounds (the order
reversed every other round) so that load from other processes hits all alike:

  mlx_dpo              the default: kernels chosen by measurement (mlx_dpo.kernel_choice)
  attention-off, swiglu-off, head-off, lora-off, kernels-off   each kernel (or all) off
  trl                  TRL's DPOTrainer, its defaults (reference forward every step)
  trl-precompute       the same with precompute_ref_log_probs=True
  mlx-lm-lora          mlx-lm-lora 5.10.2's DPO trainer (reference model every step)

TRL and mlx-lm-lora run in the benchmark venv (--bench-python, default .bench-venv/bin/python;
make it with `python3 -m venv .bench-venv && .bench-venv/bin/pip install torch==2.13.0
trl==1.16.0 peft datasets mlx-lm-lora==5.10.2 "mlx[cpu]" mkl`); they are never dependencies of
the project. TRL has no 4-bit CPU path (bitsandbytes needs a GPU) and cannot read the demo's
MLX-quantized weights: those cells are "n/a". A side that runs past --timeout is "timeout", one
the kernel's OOM killer ends (each child asks to be its first pick) is "out of memory". An
mlx_dpo cell whose memory plan does not fit the machine runs with --grad-checkpoint, as
`mlx_dpo train`'s refusal offers, and says so. Each cell is the marginal seconds per update after
--warmup updates (min over --steps and rounds), peak RSS, and for mlx_dpo the memory plan.
Where the default trails one of its own variants by more than 5% but by no more than the
updates' spread (slowest over fastest after warm-up, in either cell), the table says so: run
that point again with more --steps and --rounds before reading it as a wrong decision.
Writes <out>.json and <out>.md (default benchmarks/out/grid-<time>), and each process's run in
<out>.runs; with --resume a command takes up where one with the same --out stopped, keeping the
runs it finished on this CPU (the table's header counts them: their seconds are from another
stretch of the machine's time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from common import SPECS, Spec, load_average, step_flops, write_checkpoint  # noqa: E402

from mlx_dpo.platform import cpu_model  # noqa: E402

MLX_VARIANTS = {  # variant -> grid_mlx.py's arguments
    "mlx_dpo": [],
    "attention-off": ["--kernels", "attention=off"],
    "swiglu-off": ["--kernels", "swiglu=off"],
    "head-off": ["--kernels", "head=off"],
    "lora-off": ["--kernels", "lora=off"],
    "kernels-off": ["--kernels", "all=off"],
    "share-off": ["--no-share-prompt"],  # two rows per pair: the prompt computed twice
}
OTHER_VARIANTS = ("trl", "trl-precompute", "mlx-lm-lora")
VARIANTS = (*MLX_VARIANTS, *OTHER_VARIANTS)
MODELS = ("demo", "5m", "40m", "smollm2-135m", "qwen2.5-0.5b")
LORA_RANK = 8  # every side: r=8 on q/k/v/o/gate/up/down of every block
QUICK = [  # (model, length, pairs, dtype): the representative points run by --quick
    ("5m", 128, 2, "fp32"),
    ("5m", 512, 2, "fp32"),
    ("40m", 128, 1, "fp32"),
    ("demo", 128, 2, "q4"),
]


def model_spec(name: str, qwen_layers: int) -> Spec | None:
    from dataclasses import replace

    return {
        "demo": None,
        "5m": SPECS["5m"],
        "40m": SPECS["mid"],
        "smollm2-135m": SPECS["smollm2-135m"],
        "qwen2.5-0.5b": replace(SPECS["qwen2.5-0.5b"], num_hidden_layers=qwen_layers),
    }[name]


def checkpoint(name: str, qwen_layers: int, root: Path) -> Path:
    spec = model_spec(name, qwen_layers)
    if spec is None:
        return HERE.parent / "mlx_dpo" / "demo" / "model"
    path = root / f"{name}-{spec.num_hidden_layers}L"
    if not (path / "model.safetensors").exists():
        write_checkpoint(path, spec)
    return path


def command(variant, model_dir, length, pairs, dtype, args, out_json) -> list[str] | None:
    common = [str(model_dir), "--pairs", str(pairs), "--length", str(length)]
    common += ["--warmup", str(args.warmup), "--steps", str(args.steps), "--json", str(out_json)]
    q4 = ["--quantize", "4"] if dtype == "q4" else []
    if variant in MLX_VARIANTS:
        return [sys.executable, str(HERE / "grid_mlx.py"), *common, *q4, *MLX_VARIANTS[variant]]
    if not Path(args.bench_python).exists():
        return None
    if variant.startswith("trl"):
        if dtype == "q4" or "demo" in str(model_dir):
            return None  # TRL on the CPU: no 4-bit path, and the demo's weights are MLX's
        extra = ["--precompute"] if variant == "trl-precompute" else []
        return [args.bench_python, str(HERE / "grid_trl.py"), *common, *extra]
    if dtype == "q4" and "demo" in str(model_dir):
        q4 = []  # already 4-bit
    return [args.bench_python, str(HERE / "grid_lora.py"), *common, *q4]


def _oom_first() -> None:
    """In the child: ask the kernel's OOM killer to take this process first, so a side that
    needs more memory than the machine has ends as its own cell, not as the grid's shell."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:  # not Linux
        pass


def run_variant(cmd: list[str], env: dict, timeout: int, out_json: Path) -> dict | None:
    """Run one cell's process. None when it wrote its result; else the cell that says why not:
    "timeout" (ran past --timeout: slower than timeout / (warmup + steps) per update, loading
    aside), "out of memory" (killed by SIGKILL, the OOM killer's signal) or "failed"."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=_oom_first)  # fmt: skip
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        return {"status": "timeout", "timeout_s": timeout, "stderr": err[-2000:]}
    if proc.returncode == 0 and out_json.exists():
        return None
    status = "out of memory" if proc.returncode == -9 else "failed"
    return {"status": status, "returncode": proc.returncode, "stderr": proc.stderr[-2000:]}


def earlier_run(out_json: Path, cpu: str) -> dict | None:
    """With --resume: the run that an earlier command with the same --out finished for this
    cell and round on this CPU (its JSON in <out>.runs), else None: run it."""
    try:
        res = json.loads(out_json.read_text())
    except (OSError, ValueError):
        return None
    return {**res, "resumed": True} if res.get("cpu") == cpu and "step_s_min" in res else None


def run_once(cmd: list[str], args, out_json: Path, cpu: str) -> dict:
    """One cell's process for one round: its result, with the CPU it ran on (`cpu`, for
    --resume), or the cell that says why it has none."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:  # every side alike: MKL/OpenBLAS/OpenMP (torch's intra-op too)
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[k] = str(args.threads)
    t0 = time.time()
    failed = run_variant(cmd, env, args.timeout, out_json)
    if failed:
        return failed
    res = {**json.loads(out_json.read_text()), "wall_s": time.time() - t0, "cpu": cpu}
    out_json.write_text(json.dumps(res, indent=1))
    return res


def run_point(point, args, root: Path, tmp: Path) -> dict:
    model, length, pairs, dtype = point
    model_dir = checkpoint(model, args.qwen_layers, root)
    cpu = cpu_model()  # read once: every run of the point is on this CPU
    cells: dict[str, dict] = {}
    for r in range(args.rounds):
        order = list(args.variants)[:: 1 if r % 2 == 0 else -1]
        for v in order:
            out_json = tmp / f"{model}-{length}-{pairs}-{dtype}-{v}-{r}.json"
            cmd = command(v, model_dir, length, pairs, dtype, args, out_json)
            if cmd is None:
                cells.setdefault(v, {"status": "n/a"})
                continue
            res = earlier_run(out_json, cpu) if args.resume else None
            res = res or run_once(cmd, args, out_json, cpu)
            if "step_s_min" not in res:
                cells[v] = res
                print(f"  {v}: {res['status']}\n{res.get('stderr', '')[-800:]}", flush=True)
                continue
            cell = cells.setdefault(v, {"status": "ok", "runs": []})
            cell.setdefault("runs", []).append(res)
            cell["status"] = "ok"
            print(f"  {v} round {r}: {res['step_s_min']:.3f} s/update, "
                  f"RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB"
                  + (" (resumed)" if res.get("resumed") else ""), flush=True)  # fmt: skip
    for cell in cells.values():
        if cell.get("runs"):
            summarize(cell, args.warmup)
    point = {"model": model, "length": length, "pairs": pairs, "dtype": dtype, "cells": cells}
    spec = model_spec(model, args.qwen_layers)
    return {**point, "flops": flop_ratios(spec, length, pairs)} if spec else point


def summarize(cell: dict, warmup: int) -> None:
    """A cell's figures from its runs (one per round): the fastest update, the largest RSS,
    the plan, and the spread of its updates after warm-up (slowest over fastest - 1)."""
    runs = cell["runs"]
    cell["step_s"] = min(x["step_s_min"] for x in runs)
    cell["peak_rss_bytes"] = max(x["peak_rss_bytes"] for x in runs)
    cell["load_average"] = [x["load_average"] for x in runs]
    steady = [t for x in runs for t in x.get("step_times", [])[warmup:]]
    if len(steady) > 1:
        cell["spread"] = max(steady) / min(steady) - 1
    if "plan" in runs[0]:
        cell["plan_bytes"] = runs[0]["plan"]["total"]
        cell["plan_parts"] = runs[0]["plan"]["parts"]
    if any(x.get("grad_checkpoint") for x in runs):  # the plan did not fit without
        cell["grad_checkpoint"] = True
    if "decisions" in runs[-1]:
        cell["decisions"] = runs[-1]["decisions"]


def side_flops(spec: Spec, length: int, pairs: int) -> dict:
    """Model FLOPs of one update per side at a point. mlx_dpo: the policy's forward and
    backward over one row prompt | chosen | rejected per pair, the head at completion
    positions only (the reference is cached); mlx-lm-lora and TRL's default: two rows per
    pair, full logits, plus a reference forward every update; TRL with
    precompute_ref_log_probs: full logits, no reference forward."""
    rows, positions, half = 2 * pairs, length - 1, length // 2
    full = step_flops(spec, rows, positions, positions, LORA_RANK)
    with_reference = full["step"] + full["reference_forward"]
    answer = length - half  # grid pairs: a prompt of `half` tokens, answers of the rest
    shared = step_flops(spec, pairs, half + 2 * answer - 1, answer, LORA_RANK, head_rows=rows)
    return {
        "mlx_dpo": shared["step"],
        "mlx-lm-lora": with_reference,
        "trl": with_reference,
        "trl-precompute": full["step"],
    }


def flop_ratios(spec: Spec, length: int, pairs: int) -> dict:
    """The others' model FLOPs per update over mlx_dpo's (`side_flops`): how much faster
    mlx_dpo can be by doing less work, at equal GEMM efficiency."""
    f = side_flops(spec, length, pairs)
    return {
        "ours": f["mlx_dpo"],
        "reference_every_update": f["trl"] / f["mlx_dpo"],
        "full_logits": f["trl-precompute"] / f["mlx_dpo"],
    }


def _s(cell: dict | None) -> str:
    if not cell:
        return "-"
    if cell.get("status") != "ok":
        return cell.get("status", "-")
    return f"{cell['step_s']:.2f}" + (" (grad checkpoint)" if cell.get("grad_checkpoint") else "")


def ratio(a: dict | None, b: dict | None) -> float | None:
    """b's time over a's (how many times faster a is), when both ran."""
    if a and b and a.get("status") == b.get("status") == "ok":
        return b["step_s"] / a["step_s"]
    return None


def _x(r: float | None) -> str:
    return "-" if r is None else f"{r:.2f}x"


def _vs_best(default: dict | None, best: dict | None) -> str:
    """How much slower the default is than its fastest own variant. Past the target's 5%,
    with the larger of the two cells' update spreads where the gap is within it: on a noisy
    machine the minimum of a few updates moves by about that much, and such a gap calls for
    more --steps and --rounds, not a new decision."""
    if not default or default.get("status") != "ok" or best is None:
        return "-"
    gap = default["step_s"] / best["step_s"] - 1
    text = f"{gap * 100:+.0f}%"
    noise = max(default.get("spread", 0.0), best.get("spread", 0.0))
    if gap > 0.05 and gap <= noise:
        text += f" (updates vary {noise * 100:.0f}%)"
    return text


def markdown(points: list[dict], variants) -> str:
    head = ["model", "T", "pairs", "dtype", *variants]
    head += ["default vs best own", "TRL / default", "TRL-pre / default", "mlx-lm-lora / default"]
    head += ["FLOPs mlx-lm-lora (and TRL) / ours", "FLOPs TRL-pre / ours"]
    head += ["RSS MiB", "plan MiB", "plan / RSS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        c = p["cells"]
        d = c.get("mlx_dpo")
        own = [c[v] for v in MLX_VARIANTS if c.get(v, {}).get("status") == "ok"]
        best = min(own, key=lambda x: x["step_s"], default=None)
        rss = d.get("peak_rss_bytes") if d else None
        plan = d.get("plan_bytes") if d else None
        row = [p["model"], str(p["length"]), str(p["pairs"]), p["dtype"]]
        row += [_s(c.get(v)) for v in variants]
        row += [
            _vs_best(d, best),
            _x(ratio(d, c.get("trl"))),
            _x(ratio(d, c.get("trl-precompute"))),
            _x(ratio(d, c.get("mlx-lm-lora"))),
            _x(p.get("flops", {}).get("reference_every_update")),
            _x(p.get("flops", {}).get("full_logits")),
            "-" if not rss else f"{rss / 2**20:.0f}",
            "-" if not plan else f"{plan / 2**20:.0f}",
            "-" if not (rss and plan) else f"{plan / rss:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} points: {QUICK}")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--lengths", nargs="+", type=int, default=[128, 512, 1024])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 8])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "q4"], choices=["fp32", "q4"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--qwen-layers", type=int, default=2, help="of Qwen2.5-0.5B's 24 blocks")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="BLAS/OpenMP threads for every process (0: the libraries' defaults). On a machine "
        "shared with other jobs, 1: OpenMP's spinning threads collapse when a core is taken",
    )
    p.add_argument("--timeout", type=int, default=3600, help="seconds per process")
    p.add_argument("--bench-python", default=str(HERE.parent / ".bench-venv" / "bin" / "python"))
    p.add_argument("--out", help="output path without suffix (default benchmarks/out/grid-<time>)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs an earlier command with the same --out finished on this CPU "
        "(<out>.runs), running only the rest: a grid of many hours taken up where it stopped",
    )
    return p.parse_args(argv)


def header(report: dict) -> str:
    """The line above the table: what the figures were measured on."""
    loads = [report.get(k) or "?" for k in ("load_average_before", "load_average_after")]
    line = (
        f"CPU: {report['cpu']}; BLAS threads: {report['threads']}; load average (1, 5, 15 min) "
        f"before {loads[0]}, after {loads[1]}"
    )
    points = report.get("points", [])
    runs = [x for p in points for c in p["cells"].values() for x in c.get("runs", [])]
    resumed = sum(bool(x.get("resumed")) for x in runs)
    if resumed:  # their seconds are from another stretch of the machine's time
        line += f"; {resumed} of {len(runs)} runs resumed from an earlier command (--resume)"
    return line


def main(argv=None) -> dict:
    args = parse_args(argv)
    points = (
        QUICK
        if args.quick
        else list(itertools.product(args.models, args.lengths, args.batches, args.dtypes))
    )
    out = Path(args.out or HERE / "out" / time.strftime("grid-%Y%m%d-%H%M%S"))
    out.parent.mkdir(parents=True, exist_ok=True)
    root, tmp = HERE / "out" / "checkpoints", out.with_suffix(".runs")
    tmp.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(sys.argv),
        "cpu": cpu_model(),  # each point's figures hold for this CPU: cpu_model tells them apart
        "threads": args.threads or "library defaults",
        "load_average_before": load_average(),
        "points": [],
    }
    for point in points:
        print(f"{point}:", flush=True)
        report["points"].append(run_point(point, args, root, tmp))
        report["load_average_after"] = load_average()
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        table = markdown(report["points"], args.variants)
        out.with_suffix(".md").write_text(f"{header(report)}\n\n{table}\n")
    print(header(report), markdown(report["points"], args.variants), sep="\n\n")
    print(f"wrote {out}.json and {out}.md")
    return report


if __name__ == "__main__":
    main()
