#!/usr/bin/env python
"""Benchmark one LoRA DPO step of mlx_dpo, side by side with the same step in PyTorch.

    python benchmarks/bench.py                      # mid-qwen2 (40M, vocab 32k), 2 pairs x 256
    python benchmarks/bench.py --compare-torch      # + the PyTorch step, in its own process
    python benchmarks/bench.py --levers             # + each speed/memory lever on its own
    python benchmarks/bench.py --memory             # vocab 152k: peak vs naive, vs length
    python benchmarks/bench.py --all                # everything above + BLAS off + both kernels
    python benchmarks/bench.py --tiny               # a seconds-long smoke run (tests)

The headline variants are `mlx_dpo`, the trainer's step as the package runs it (on the x86 CPU
build with mlx_dpo.cpu_kernels: fused-arithmetic exp, flash attention), and `mx.exp`, the same
step opted out of them (MLX_DPO_NO_FAST_EXP=1); mlx_worker.VARIANTS lists the others.

Every measurement runs in a fresh process (the BLAS choice is fixed when MLX loads; torch and
the OpenBLAS preload must not share a process), one after the other; within a process the
variants' rounds are interleaved. Times are min and median over --repeats after --warmup.
Prints one table and writes JSON (--json; default benchmarks/out/bench-<time>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]  # this checkout's mlx_dpo, and common.py

from common import SPECS, Spec, load_average, max_rss_mb, read_spec, write_checkpoint  # noqa: E402

WAIT_QUIET = 0.0  # --wait-quiet
DEFAULT_VARIANTS = ["mlx_dpo", "mx.exp"]
LEVER_VARIANTS = [  # with the fast CPU kernels, as mlx_dpo, unless named +mx.exp
    "plain-logits",
    "naive-logits",
    "no-compile",
    "cache-32MB",
    "online-ref",
    "grad-ckpt",
    "grad-ckpt+mx.exp",
    "q4-dequant",
    "q4-native",
]
STREAM_VARIANTS = ["mlx_dpo", "2streams", "mx.exp", "2streams+mx.exp"]
MEMORY_VARIANTS = [
    "mlx_dpo",
    "grad-ckpt",
    "mx.exp",
    "grad-ckpt+mx.exp",
    "naive-logits",
    "naive+ckpt",
]
SWEEP_VARIANTS = ["mlx_dpo", "grad-ckpt", "mx.exp", "grad-ckpt+mx.exp"]
TORCH_VARIANTS = [
    "own:completion",
    "own:full",
    "own:completion:compile",
    "hf:completion",
    "hf:full",
]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time and size one mlx_dpo LoRA DPO step (and the same step in PyTorch).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1],
    )
    p.add_argument("--model", help="an HF-format Qwen2/Llama directory (default: random init)")
    p.add_argument("--spec", default="mid", choices=sorted(SPECS), help="random-init shape")
    p.add_argument("--pairs", type=int, default=2, help="preference pairs per step (2 rows each)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--ref-batch-pairs", type=int, default=8, help="the precompute's batch")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--process-rounds",
        type=int,
        default=1,
        help="run the MLX and torch processes this many times, alternating; min over all",
    )
    p.add_argument("--variants", nargs="+", help="MLX variants (mlx_worker.VARIANTS)")
    p.add_argument("--levers", action="store_true", help="measure every lever")
    p.add_argument("--compare-torch", action="store_true", help="the same step in PyTorch")
    p.add_argument("--torch-variants", nargs="+", default=None)
    p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    p.add_argument(
        "--torch-device", default="auto", help="auto: CUDA, else MPS, else CPU (cpu to force)"
    )
    p.add_argument("--streams", action="store_true", help="2 CPU streams, OpenBLAS at 1 thread")
    p.add_argument("--memory", action="store_true", help="vocab-152k memory vs naive and T")
    p.add_argument("--blas-off", action="store_true", help="also without the fast BLAS")
    p.add_argument("--both-kernels", action="store_true", help="also OpenBLAS's native kernel")
    p.add_argument("--all", action="store_true", help="everything")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each process, wait up to S s for the other processes to quiet down",
    )
    p.add_argument("--tiny", "--quick", action="store_true", help="tiny model, 1 repeat")
    p.add_argument("--json", help="output path (default benchmarks/out/bench-<time>.json)")
    p.add_argument("--worker", choices=["mlx"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--lora-out", help=argparse.SUPPRESS)
    p.add_argument("--extras", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.all:
        args.levers = args.compare_torch = args.memory = args.blas_off = args.streams = True
        args.both_kernels = True
    if args.tiny:
        args.spec, args.warmup, args.repeats = "tiny", 1, 1
        args.prompt_len, args.completion_len = (
            min(args.prompt_len, 32),
            min(args.completion_len, 32),
        )
        args.ref_batch_pairs = min(args.ref_batch_pairs, 4)
    return args


# ---------------------------------------------------------------------------------------------
# Worker processes


def worker_args(args, model_dir, json_path, variants, **over) -> list[str]:
    vals = {
        "pairs": args.pairs,
        "prompt_len": args.prompt_len,
        "completion_len": args.completion_len,
        "ref_batch_pairs": args.ref_batch_pairs,
        "lora_rank": args.lora_rank,
        "lora_scale": args.lora_scale,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "seed": args.seed,
        **over,
    }
    flags = [k for k, v in vals.items() if v is True]
    out = [f"--{k.replace('_', '-')}={v}" for k, v in vals.items() if v is not True]
    out += [f"--{k.replace('_', '-')}" for k in flags]
    out += ["--model-dir", str(model_dir), "--json", str(json_path), "--variants", *variants]
    return out + (["--tiny"] if args.tiny else [])


def cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat (Linux), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def wait_quiet(max_wait: float, busy_below: float = 0.25) -> float | None:
    """Wait (up to max_wait s) until other processes keep the CPUs < busy_below busy over 2 s;
    returns the last busy fraction seen."""
    deadline, busy = time.monotonic() + max_wait, None
    while True:
        a = cpu_jiffies()
        time.sleep(2)
        b = cpu_jiffies()
        if a is None or b is None:
            return None
        busy = (b[0] - a[0]) / max(b[1] - a[1], 1)
        if busy < busy_below or time.monotonic() > deadline:
            return busy


def run_process(cmd: list[str], env: dict | None, label: str, json_path: Path) -> dict:
    """Run one worker; also record how busy the rest of the machine kept the CPUs meanwhile
    (all CPU time minus the worker's own)."""
    busy_before = wait_quiet(WAIT_QUIET) if WAIT_QUIET else None
    print(f"[bench] {label} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    j0, r0 = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    j1, r1 = cpu_jiffies(), resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return {"error": f"{label} failed with status {proc.returncode}"}
    out = json.loads(json_path.read_text())
    wall = time.perf_counter() - t0
    out["wall_s"] = wall
    if j0 and j1:
        ticks = os.sysconf("SC_CLK_TCK")
        ours = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
        cpus = os.cpu_count() or 1
        others = max((j1[0] - j0[0]) / ticks - ours, 0.0)
        out["load"] = {
            "others_cpu_fraction": others / (wall * cpus),  # 0: idle machine, 1: all cores busy
            "worker_cpu_s": ours,
            "busy_before": busy_before,
        }
    return out


def mlx_run(args, model_dir, tmp, label, variants, env_over=None, **over) -> dict:
    path = Path(tmp) / f"{label}.json"
    env = {**os.environ, **(env_over or {})}
    env = {k: v for k, v in env.items() if v is not None}
    cmd = [sys.executable, __file__, "--worker", "mlx"]
    cmd += worker_args(args, model_dir, path, variants, **over)
    out = run_process(cmd, env, f"mlx {label}: {' '.join(variants)}", path)
    out["env"] = {k: v for k, v in (env_over or {}).items()}
    return out


def merge_runs(runs: list[dict]) -> dict:
    """One run from several of the same process: per phase the min of the mins, the median of
    the medians, the max of the peaks; the GEMM peak's max."""
    ok = [r for r in runs if "results" in r]
    if len(ok) <= 1:
        return ok[0] if ok else runs[0]
    out = dict(ok[0])
    out["gemm_peak_gflops"] = max(r["gemm_peak_gflops"] for r in ok)
    out["process_rounds"] = len(ok)
    loads = [r["load"]["others_cpu_fraction"] for r in ok if "load" in r]
    if loads:
        out["load"] = {**ok[0]["load"], "others_cpu_fraction": sum(loads) / len(loads)}
    results = {}
    for name, res in ok[0]["results"].items():
        merged = dict(res)
        for phase, v in res.items():
            if not (isinstance(v, dict) and "min_ms" in v):
                continue
            all_ = [r["results"][name][phase] for r in ok if phase in r["results"].get(name, {})]
            merged[phase] = {
                **v,
                "min_ms": min(a["min_ms"] for a in all_),
                "median_ms": statistics.median(a["median_ms"] for a in all_),
                "round_min_ms": [a["min_ms"] for a in all_],
                "n": sum(a["n"] for a in all_),
            }
            for key in ("peak_mb", "peak_above_mb"):
                if key in v:
                    merged[phase][key] = max(a[key] for a in all_)
        results[name] = merged
    out["results"] = results
    return out


def torch_run(args, model_dir, tmp, lora_init) -> dict:
    path = Path(tmp) / f"torch{time.monotonic_ns()}.json"
    variants = args.torch_variants or (
        ["own:completion", "own:full"] if args.tiny else TORCH_VARIANTS
    )
    cmd = [sys.executable, str(HERE / "torch_step.py"), "--lora-init", str(lora_init)]
    cmd += [f"--threads={args.torch_threads}", f"--device={args.torch_device}", f"--beta={0.1}"]
    cmd += worker_args(args, model_dir, path, variants)
    cmd.remove(f"--ref-batch-pairs={args.ref_batch_pairs}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.torch_threads or os.cpu_count())}
    return run_process(cmd, env, f"torch: {' '.join(variants)}", path)


# ---------------------------------------------------------------------------------------------
# Reporting


def step_row(name: str, res: dict, batch: dict, pairs: int, peak: float) -> dict:
    step_s = res["step"]["min_ms"] / 1e3
    fl = res["flops"]["step"]
    ref = res.get("reference")
    ref_big = res.get("reference_big")
    row = {
        "variant": name,
        "ref_ms_per_pair": ref["min_ms"] / pairs if ref else None,
        "fwd_bwd_ms": res["fwd_bwd"]["min_ms"],
        "optimizer_ms": res["optimizer"]["min_ms"],
        "step_min_ms": res["step"]["min_ms"],
        "step_median_ms": res["step"]["median_ms"],
        "pairs_per_s": pairs / step_s,
        "tokens_per_s": batch["tokens"] / step_s,
        "gflops": fl / step_s / 1e9,
        "mfu": fl / step_s / 1e9 / peak,
        "peak_mb": res["step"].get("own_peak_mb", res["step"].get("peak_mb")),
        "peak_above_mb": res["step"].get("peak_above_mb"),
    }
    if ref_big:
        row["ref_big_ms_per_pair"] = ref_big["min_ms"] / ref_big.get("pairs", 1)
    return row


def fmt(x, spec="{:.0f}") -> str:
    return "-" if x is None else spec.format(x)


def table(rows: list[dict]) -> str:
    head = (
        f"{'variant':<34} {'ref/pair':>8} {'fwd+bwd':>8} {'opt':>5} {'step min':>9} "
        f"{'median':>7} {'pairs/s':>7} {'tok/s':>6} {'GF/s':>5} {'MFU':>5} {'peak MB':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['variant']:<34} {fmt(r['ref_ms_per_pair']):>8} {fmt(r['fwd_bwd_ms']):>8} "
            f"{fmt(r['optimizer_ms']):>5} {fmt(r['step_min_ms']):>9} "
            f"{fmt(r['step_median_ms']):>7} {fmt(r['pairs_per_s'], '{:.2f}'):>7} "
            f"{fmt(r['tokens_per_s']):>6} {fmt(r['gflops']):>5} "
            f"{fmt(100 * r['mfu'], '{:.0f}%'):>5} {fmt(r['peak_mb']):>8}"
        )
    return "\n".join(lines)


def rows_of(run: dict, pairs: int, peak: float, prefix: str = "") -> list[dict]:
    if "results" not in run:
        return []
    out = []
    for name, res in run["results"].items():
        if "step" in res:
            out.append(step_row(prefix + name, res, run["batch"], pairs, peak))
    return out


def close(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b, strict=True))


def agreement(mlx_step0: dict, torch_res: dict) -> dict:
    """Largest relative differences of the step-0 numbers, MLX vs each torch variant."""
    out = {}
    for name, res in torch_res.get("results", {}).items():
        t0 = res.get("step0")
        if not t0:
            continue
        names = sorted(mlx_step0["grad_norms"])
        m_g = [mlx_step0["grad_norms"][n] for n in names]
        t_g = [t0["grad_norms"][n] for n in names]
        big = [i for i, g in enumerate(m_g) if g > 1e-6 * max(m_g)]
        out[name] = {
            "policy_logps_rel": close(mlx_step0["policy_logps"], t0["policy_logps"]),
            "loss_abs": abs(mlx_step0["loss"] - t0["loss"]),
            "grad_norms_rel": close([m_g[i] for i in big], [t_g[i] for i in big]),
        }
    return out


def memory_section(args, model_dir_152k, tmp) -> dict:
    """Vocab 152k: the step's peak (lean vs naive log-probs, the CPU kernels vs mx.exp, with and
    without grad checkpointing) at the standard batch and over T."""
    out = {"standard": mlx_run(args, model_dir_152k, tmp, "mem152k", MEMORY_VARIANTS, repeats=2)}
    sweep = {}
    lengths = [64, 128, 256] if args.tiny else [128, 256, 512, 1024]
    for n in lengths:
        variants = SWEEP_VARIANTS + (["naive-logits"] if n <= 256 else [])
        sweep[n * 2] = mlx_run(
            args, model_dir_152k, tmp, f"mem152k-T{2 * n}", variants,
            pairs=1, prompt_len=n, completion_len=n, warmup=1, repeats=1,
        )  # fmt: skip
    out["length_sweep_1pair"] = sweep
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    global WAIT_QUIET
    WAIT_QUIET = args.wait_quiet
    variants = args.variants or (DEFAULT_VARIANTS + (LEVER_VARIANTS if args.levers else []))
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    report: dict = {
        "meta": {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "started": started,
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_before": load_average(),
            "env": {k: os.environ.get(k) for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")},
        },
        "args": {k: v for k, v in vars(args).items() if not k.startswith(("worker", "model_dir"))},
    }
    with tempfile.TemporaryDirectory(prefix="mlx_dpo_bench_") as tmp:
        if args.model:
            model_dir = Path(args.model)
        else:
            model_dir = write_checkpoint(Path(tmp) / args.spec, SPECS[args.spec], seed=args.seed)
        spec = read_spec(model_dir)
        report["model"] = {"path": str(args.model or f"random init ({args.spec})"), **vars(spec)}
        report["model"]["params"] = spec.params()
        lora = Path(tmp) / "lora_init.safetensors"
        mlx_runs, torch_runs = [], []
        for r in range(args.process_rounds):  # alternate, so that load hits both sides alike
            extras = {"extras": True} if args.levers and r == 0 else {}
            # later rounds repeat only the headline variants
            names = variants if r == 0 else [v for v in variants if v in DEFAULT_VARIANTS]
            mlx_runs.append(
                mlx_run(args, model_dir, tmp, f"main{r}", names, lora_out=lora, **extras)
            )
            if args.compare_torch and lora.exists():
                torch_runs.append(torch_run(args, model_dir, tmp, lora))
        report["mlx"] = merge_runs(mlx_runs)
        if torch_runs:
            report["torch"] = merge_runs(torch_runs)
        if args.streams:  # one BLAS thread per stream, or 2 streams x 2 threads oversubscribe
            report["mlx_streams"] = mlx_run(
                args, model_dir, tmp, "streams", STREAM_VARIANTS,
                env_over={"OPENBLAS_NUM_THREADS": "1"}, ref_batch_pairs=0,
            )  # fmt: skip
        if args.blas_off:
            report["mlx_blas_off"] = mlx_run(
                args, model_dir, tmp, "blas-off", ["mlx_dpo"],
                env_over={"MLX_DPO_NO_FAST_BLAS": "1"}, warmup=1, repeats=1, ref_batch_pairs=0,
            )  # fmt: skip
        if args.both_kernels:
            report["mlx_native_kernel"] = mlx_run(
                args, model_dir, tmp, "native-kernel", DEFAULT_VARIANTS,
                env_over={"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None},
            )  # fmt: skip
        if args.memory:
            big = SPECS["tiny"] if args.tiny else SPECS["mid-152k"]
            if args.tiny:
                big = Spec(**{**vars(big), "vocab_size": 4096})
            dir_152k = write_checkpoint(Path(tmp) / "vocab-big", big, seed=args.seed)
            report["memory"] = memory_section(args, dir_152k, tmp)
    report["meta"]["load_average_after"] = load_average()
    report["meta"]["max_rss_mb_orchestrator"] = max_rss_mb()
    summarize_report(report, args)
    path = Path(args.json) if args.json else HERE / "out" / f"bench-{started}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"\nJSON: {path}")
    return report


def summarize_report(report: dict, args) -> None:
    """Compute the derived figures (MFU, ratios, memory ratios) into report['summary'] and
    print them."""
    mlx = report["mlx"]
    if "error" in mlx:
        raise SystemExit(f"the MLX run failed: {mlx['error']}")
    torch_run_ = report.get("torch", {})
    peaks = {"mlx_blas": mlx["gemm_peak_gflops"]}
    # torch's GEMM peak counts only on the same kind of processor (CPU vs GPU) as MLX's
    torch_on_cpu = torch_run_.get("device", "cpu") == "cpu"
    if "gemm_peak_gflops" in torch_run_ and torch_on_cpu == ("cpu" in str(mlx.get("device"))):
        peaks["torch"] = torch_run_["gemm_peak_gflops"]
    native = report.get("mlx_native_kernel", {})
    if "gemm_peak_gflops" in native:
        peaks["mlx_blas_native_kernel"] = native["gemm_peak_gflops"]
    machine_peak = max(peaks.values())
    summary: dict = {"gemm_peak_gflops": peaks, "machine_peak_gflops": machine_peak}
    rows = rows_of(mlx, args.pairs, machine_peak)
    rows += rows_of(torch_run_, args.pairs, machine_peak)
    if "results" in native:
        rows += rows_of(native, args.pairs, machine_peak, prefix="[native] ")
    streams = report.get("mlx_streams", {})
    if "results" in streams:
        rows += rows_of(streams, args.pairs, machine_peak, prefix="[1 BLAS thread] ")
    off = report.get("mlx_blas_off", {})
    if "results" in off:
        rows += rows_of(off, args.pairs, machine_peak, prefix="[no fast BLAS] ")
    summary["rows"] = rows
    by = {r["variant"]: r for r in rows}
    torch_rows = [r for r in rows if r["variant"].startswith("torch")]
    same = [r for r in torch_rows if "completion" in r["variant"]]
    if torch_rows:
        best = min(same or torch_rows, key=lambda r: r["step_min_ms"])
        summary["torch_best"] = best["variant"]
        summary["ratio_step_vs_best_torch"] = {
            r["variant"]: r["step_min_ms"] / best["step_min_ms"]
            for r in rows
            if not r["variant"].startswith("torch")
        }
        summary["agreement"] = agreement(mlx.get("step0", {}), torch_run_)
        if "step0_exact_exp" in mlx:  # the default ran the fast CPU kernels: mx.exp too
            exact = agreement(mlx["step0_exact_exp"], torch_run_)
            summary["agreement"].update({f"{k} (mx.exp)": v for k, v in exact.items()})
    summary["mfu_vs_mlx_blas_peak"] = {
        r["variant"]: r["gflops"] / peaks["mlx_blas"] for r in rows if r["variant"] in by
    }
    if "memory" in report:
        summary["memory"] = memory_summary(report["memory"])
    report["summary"] = summary

    m = report["model"]
    b = mlx["batch"]
    print(
        f"\nmodel: {m['path']}: {m['params']['total'] / 1e6:.1f}M params, vocab {m['vocab_size']}, "
        f"{m['num_hidden_layers']} layers, hidden {m['hidden_size']}; LoRA r{args.lora_rank} "
        f"on q/k/v/o/gate/up/down of every block"
    )
    print(
        f"batch: {args.pairs} pairs = {b['rows']} rows x T={b['T']} ({args.prompt_len} prompt + "
        f"{args.completion_len} completion), {b['tokens']} tokens; fp32; cached reference"
    )
    print(
        f"BLAS: {mlx['blas']}; OPENBLAS_CORETYPE={report['meta']['env']['OPENBLAS_CORETYPE']}; "
        f"fp32 GEMM peak (GFLOP/s): "
        + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
        + f"; load avg {report['meta']['load_average_before']} -> "
        f"{report['meta']['load_average_after']}"
    )
    summary["load"] = {
        key: run["load"]["others_cpu_fraction"]
        for key, run in report.items()
        if isinstance(run, dict) and "load" in run
    }
    if summary["load"]:
        print(
            "other processes kept the CPUs busy during the measurement: "
            + ", ".join(f"{k} {100 * v:.0f}%" for k, v in summary["load"].items())
        )
    print(f"times in ms (min over {args.repeats} after {args.warmup} warm-up; median for step);")
    print(f"MFU = model FLOPs / step time / {machine_peak:.0f} GFLOP/s (best fp32 GEMM measured)\n")
    print(table(rows))
    if "ratio_step_vs_best_torch" in summary:
        print(f"\nstep time / best torch ({summary['torch_best']}):")
        for k, v in summary["ratio_step_vs_best_torch"].items():
            print(f"  {k:<28} {v:.2f}x")
        for k, v in summary["agreement"].items():
            print(
                f"  agreement with {k}: log-probs {v['policy_logps_rel']:.1e} rel, loss "
                f"{v['loss_abs']:.1e} abs, LoRA grad norms {v['grad_norms_rel']:.1e} rel"
            )
    plan = mlx.get("memory_plan", {})
    for name, key in (("mlx_dpo", "default"), ("grad-ckpt", "grad_ckpt")):
        if plan and name in mlx["results"]:
            measured = mlx["results"][name]["step"]
            measured = measured.get("own_peak_mb", measured["peak_mb"])
            print(
                f"memory planner, {name}: {plan[key]['total_mb']:.0f} MB planned vs "
                f"{measured:.0f} MB measured (model + optimizer + the step's peak above them)"
            )
    summary["levers"] = levers(report)
    if summary["levers"]:
        print("\nlevers (each against its baseline in the same process; <1 is faster/smaller):")
        width = max(len(r["lever"]) for r in summary["levers"])
        for r in summary["levers"]:
            print(
                f"  {r['lever']:<{width}} step x{r['step_ratio']:.2f}"
                + (f", peak x{r['peak_ratio']:.2f}" if r.get("peak_ratio") else "")
            )
    if "ops_ms" in mlx:
        print("\nsingle ops at the step's shapes (min ms):")
        for case, res in mlx["ops_ms"].items():
            print(f"  {case}: " + ", ".join(f"{k} {v:.1f}" for k, v in res.items()))
    if "bucketing" in mlx:
        bk = mlx["bucketing"]
        print(
            f"\nbatching {bk['pairs']} pairs of spread-out lengths, {bk['batch_pairs']} per batch:"
        )
        for k, v in bk.items():
            if isinstance(v, dict):
                print(
                    f"  {k:<40} padding {100 * v['padding_fraction']:.0f}%, "
                    f"{v['distinct_shapes']} distinct shapes (one trace each)"
                )
        for k, v in mlx.get("new_shape", {}).items():
            print(f"  first step at a new {k}: {v['first_ms']:.0f} ms vs {v['steady_ms']:.0f} ms")
    if "memory" in summary:
        print("\n" + memory_text(summary["memory"]))


LEVERS = [  # (lever, process key, variant, baseline variant)
    ("completion-only chunked log-probs vs full logits", "mlx", "mlx_dpo", "plain-logits"),
    ("completion-only chunked log-probs vs naive", "mlx", "mlx_dpo", "naive-logits"),
    ("cached reference vs reference in every step", "mlx", "mlx_dpo", "online-ref"),
    ("mx.compile on the step", "mlx", "mlx_dpo", "no-compile"),
    ("mx.set_cache_limit(8 GB) vs MLX's 32 MB", "mlx", "mlx_dpo", "cache-32MB"),
    ("grad checkpointing (cost)", "mlx", "grad-ckpt", "mlx_dpo"),
    (
        "cpu_kernels (fast exp, flash attention) vs MLX_DPO_NO_FAST_EXP=1",
        "mlx",
        "mlx_dpo",
        "mx.exp",
    ),
    ("cpu_kernels with grad checkpointing", "mlx", "grad-ckpt", "grad-ckpt+mx.exp"),
    ("q4 dequantize-at-use vs q4 QuantizedLinear", "mlx", "q4-dequant", "q4-native"),
    ("q4 dequantize-at-use vs fp32", "mlx", "q4-dequant", "mlx_dpo"),
    ("2 CPU streams, 1 BLAS thread each [prototype]", "mlx_streams", "2streams", "mlx_dpo"),
    ("2 CPU streams, mx.exp, 1 BLAS thread each", "mlx_streams", "2streams+mx.exp", "mx.exp"),
    ("cpu_kernels, 1 BLAS thread", "mlx_streams", "mlx_dpo", "mx.exp"),
]


def levers(report: dict) -> list[dict]:
    out = []
    for lever, key, variant, base in LEVERS:
        res = report.get(key, {}).get("results", {})
        if variant in res and base in res:
            a, b = res[variant]["step"], res[base]["step"]
            out.append(
                {
                    "lever": lever,
                    "step_ratio": a["min_ms"] / b["min_ms"],
                    "peak_ratio": a["peak_above_mb"] / b["peak_above_mb"],
                }
            )
    main = report.get("mlx", {}).get("results", {}).get("mlx_dpo")
    off = report.get("mlx_blas_off", {}).get("results", {}).get("mlx_dpo")
    if main and off:
        out.append(
            {"lever": "fast BLAS preload (vs MLX_DPO_NO_FAST_BLAS=1)",
             "step_ratio": main["step"]["min_ms"] / off["step"]["min_ms"]}
        )  # fmt: skip
    nat = report.get("mlx_native_kernel", {}).get("results", {}).get("mlx_dpo")
    if main and nat:
        out.append(
            {"lever": "OpenBLAS AVX-512 kernel vs Haswell (env)",
             "step_ratio": nat["step"]["min_ms"] / main["step"]["min_ms"]}
        )  # fmt: skip
    return out


def memory_summary(mem: dict) -> dict:
    std = mem["standard"].get("results", {})
    out: dict = {"standard": {}}
    for name, res in std.items():
        out["standard"][name] = {
            "peak_mb": res["step"].get("own_peak_mb", res["step"]["peak_mb"]),
            "peak_above_mb": res["step"]["peak_above_mb"],
            "step_ms": res["step"]["min_ms"],
        }
    naive = out["standard"].get("naive-logits")
    if naive:
        for r in out["standard"].values():
            r["vs_naive"] = r["peak_mb"] / naive["peak_mb"]
            r["above_vs_naive"] = r["peak_above_mb"] / naive["peak_above_mb"]
    sweep = {}
    for T, run in mem.get("length_sweep_1pair", {}).items():
        for name, res in run.get("results", {}).items():
            sweep.setdefault(name, {})[int(T)] = res["step"]["peak_above_mb"]
    out["length_sweep_peak_above_mb"] = sweep
    out["weights_mb"] = mem["standard"].get("weights_mb")
    return out


def memory_text(ms: dict) -> str:
    lines = [f"vocab-152k step memory (weights {fmt(ms.get('weights_mb'))} MB):"]
    for name, r in ms["standard"].items():
        ratio = f"  {100 * r['vs_naive']:.0f}% of naive ({100 * r['above_vs_naive']:.0f}% above weights)"
        lines.append(
            f"  {name:<24} peak {r['peak_mb']:6.0f} MB, above weights {r['peak_above_mb']:6.0f} MB,"
            f" step {r['step_ms']:6.0f} ms" + (ratio if "vs_naive" in r else "")
        )
    lines.append("  peak above weights (MB) vs row length T, 1 pair:")
    for name, by_t in ms["length_sweep_peak_above_mb"].items():
        lines.append(f"    {name:<24} " + ", ".join(f"T={t}: {v:.0f}" for t, v in by_t.items()))
    return "\n".join(lines)


def worker_main(args) -> dict:
    import mlx_worker

    out = mlx_worker.run_worker(args)
    out["max_rss_mb"] = max_rss_mb()
    Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    return out


if __name__ == "__main__":
    main()
