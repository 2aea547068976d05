"""Where the CPU time of one update goes, per side, at one grid point: a sampling profile.

python benchmarks/profile_point.py --model 40m --length 128 --pairs 1 [--variants mlx_dpo
  mlx-lm-lora] [--steps 12] [--threads 1] [--symbols 25]

Runs each side's grid worker (grid_mlx.py, grid_lora.py, grid_trl.py; the commands grid.py
runs) once to fill the caches (kernel decisions, MLX's compiled kernels), then twice under
Linux `perf record`: with 2 warm-up updates and 1 timed, and with 2 and --steps. The
difference is --steps - 1 steady updates, loading, warm-up and caches cancelled out, so
the samples per shared object, divided by the sampling rate and the step count, are CPU
seconds per update: the BLAS (the GEMMs), MLX's JIT-compiled fused element-wise kernels, MLX's
own library (its other ops: copies, gathers, reductions, unfused element-wise ops, the
scheduler), Python, the C runtime (allocation, memcpy), the OS, torch. Needs `perf`
(linux-tools) and a kernel that lets this user sample it (perf_event_paranoid <= 2).

With the model FLOPs of the update (common.step_flops), the BLAS seconds give the GEMMs' rate,
and the floor a side could reach if everything but its GEMMs took no time. `--symbols N` adds,
per side, the N functions that take the most CPU seconds per update (MLX's fused kernels named
by the ops they fuse): which copies, reductions and element-wise passes the time outside the
GEMMs goes to.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from grid import checkpoint, command, model_spec, side_flops  # noqa: E402

FREQ = 999  # samples per CPU second
JIT = re.compile(r"^lib[A-Z]+(?:f|i|u|b|bf|c)\d+[IO]")  # MLX's fused kernels: libCf4IAdd...so
GROUPS = (
    ("blas", re.compile(r"mkl|openblas|blas|lapack")),
    ("mlx fused kernels", JIT),
    ("mlx library", re.compile(r"^libmlx")),
    ("torch", re.compile(r"torch|gomp|iomp")),
    ("python", re.compile(r"python")),
    ("c runtime", re.compile(r"^(libc\.|libstdc\+\+|ld-linux|libm\.)")),
    ("os", re.compile(r"kernel")),
)


def group_of(dso: str) -> str:
    return next((name for name, pattern in GROUPS if pattern.search(dso)), "other")


def fused_ops(dso: str) -> str | None:
    """The ops an MLX fused kernel's library name lists, in order, without its broadcasts
    (`libFf4IBroadcastBGf4ISubtractAFH..._strided_2.so` -> "Subtract (strided)"); None for
    anything else."""
    if not JIT.search(dso):
        return None
    ops = [m for m in OP.findall(dso) if m != "Broadcast"]
    return " ".join(ops) + (" (strided)" if "_strided_" in dso else "")


OP = re.compile(r"(?:f|i|u|b|bf|c)\d+[IO]((?:[A-Z][a-z]+)+)")


def symbol_name(dso: str, sym: str) -> str:
    """A short name for one profiled function: a fused kernel by its ops, a C++ function
    without its namespaces and arguments, anything else as `library: symbol`."""
    ops = fused_ops(dso)
    if ops is not None:
        return f"fused: {ops}"
    sym = re.sub(r"^\[[.k]\]\s*", "", sym.strip())  # perf's user/kernel mark
    sym = re.sub(r"mlx::core::|\(anonymous namespace\)::|std::|detail::", "", sym)
    return f"{dso.strip()}: {sym[:90]}"


def perf_samples(perf_data: Path) -> tuple[dict[str, int], dict[str, int]]:
    """(samples by group, samples by function) of one `perf record` file, from one report."""
    report = subprocess.run(
        ["perf", "report", "-i", str(perf_data), "--stdio", "-g", "none", "--sort", "dso,sym",
         "-F", "sample,dso,sym", "-t", "|"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return samples_from_report(report)


def samples_from_report(report: str) -> tuple[dict[str, int], dict[str, int]]:
    """`perf report -F sample,dso,sym -t '|'` lines summed by group and by function name."""
    groups: dict[str, int] = {}
    functions: dict[str, int] = {}
    for line in report.splitlines():
        parts = line.split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            n, group, name = int(parts[0]), group_of(parts[1].strip()), symbol_name(*parts[1:])
            groups[group] = groups.get(group, 0) + n
            functions[name] = functions.get(name, 0) + n
    return groups, functions


def profiled(cmd: list[str], env: dict, perf_data: Path) -> tuple[dict, dict]:
    """(samples by group, by symbol) of one run under `perf record`."""
    full = ["perf", "record", "-q", "-F", str(FREQ), "-o", str(perf_data), "--", *cmd]
    proc = subprocess.run(full, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"profile_point: {' '.join(cmd[:2])} failed:\n{proc.stderr[-1500:]}")
    return perf_samples(perf_data)


def per_update(long: dict[str, int], short: dict[str, int], updates: int) -> dict[str, float]:
    """CPU seconds per update by group: the long run's samples less the short run's, over the
    updates only the long run did."""
    return {g: (long.get(g, 0) - short.get(g, 0)) / FREQ / updates for g in {*long, *short}}


def profile_side(variant: str, args, model_dir: Path, tmp: Path, env: dict) -> dict | None:
    def cmd(steps: int) -> list[str] | None:
        ns = argparse.Namespace(
            warmup=2, steps=steps, bench_python=args.bench_python, threads=args.threads
        )
        out_json = tmp / f"{variant}-{steps}.json"
        return command(variant, model_dir, args.length, args.pairs, args.dtype, ns, out_json)

    warm = cmd(1)
    if warm is None:
        return None
    # unprofiled first: kernel timing, MLX's JIT compiles and disk caches land here
    subprocess.run(warm, env=env, capture_output=True, check=True)
    short = profiled(cmd(1), env, tmp / f"{variant}-short.perf")
    long = profiled(cmd(args.steps), env, tmp / f"{variant}-long.perf")
    result = json.loads((tmp / f"{variant}-{args.steps}.json").read_text())
    by_symbol = per_update(long[1], short[1], args.steps - 1)
    top = sorted(by_symbol.items(), key=lambda kv: -kv[1])[: args.symbols]
    return {
        "step_s": result["step_s_min"],
        "cpu_s": per_update(long[0], short[0], args.steps - 1),
        "top_symbols": dict(top),
    }


def flops_of(variant: str, args) -> float:
    f = side_flops(model_spec(args.model, args.qwen_layers), args.length, args.pairs)
    return f.get(variant, f["mlx_dpo"])  # mlx_dpo's own variants do its work


def table(results: dict, args) -> str:
    groups = [g for g, _ in GROUPS] + ["other"]
    head = "| side | s/update (min) | " + " | ".join(groups) + " | GEMM GFLOP/s | GEMM floor s |"
    lines = [head, "|" + "---|" * (len(groups) + 4)]
    for variant, r in results.items():
        cpu = r["cpu_s"]
        blas = max(cpu.get("blas", 0.0), 1e-9)
        gflop = flops_of(variant, args) / 1e9
        cells = " | ".join(f"{cpu.get(g, 0.0):.3f}" for g in groups)
        lines.append(
            f"| {variant} | {r['step_s']:.3f} | {cells} | {gflop / blas:.0f} | {blas:.3f} |"
        )
    for variant, r in results.items():
        if r.get("top_symbols"):
            lines += ["", f"| {variant}: function | CPU s/update |", "|---|---|"]
            lines += [f"| {name} | {sec:.3f} |" for name, sec in r["top_symbols"].items()]
    return "\n".join(lines)


def _at_least_2(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 2 (the long run less the short one)")
    return int(text)


def point_parser(description: str, steps: int) -> argparse.ArgumentParser:
    """The options of a one-point profile (this script's and gemm_shapes.py's): the point, the
    sides, the long run's updates; --steps of at least 2 (the long run less the short one)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="40m", choices=["5m", "40m", "smollm2-135m", "qwen2.5-0.5b"])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--pairs", type=int, default=1)
    p.add_argument("--variants", nargs="+", default=["mlx_dpo", "mlx-lm-lora"])
    p.add_argument(
        "--steps", type=_at_least_2, default=steps,
        help="timed updates of the long run (the profile is the long run less the short one)",
    )  # fmt: skip
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--qwen-layers", type=int, default=4)
    p.add_argument("--bench-python", default=str(HERE.parent / ".bench-venv" / "bin" / "python"))
    p.add_argument("--json", help="write the result here too")
    return p


def worker_env(threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def main(argv=None) -> dict:
    p = point_parser(__doc__.splitlines()[0], steps=12)
    p.add_argument("--dtype", default="fp32", choices=["fp32"])
    p.add_argument("--symbols", type=int, default=0, help="also the top N functions per side")
    args = p.parse_args(argv)
    if shutil.which("perf") is None:
        raise SystemExit("profile_point: needs Linux `perf` (apt install linux-perf)")
    env = worker_env(args.threads)
    return run_point(
        args,
        lambda v, model_dir, tmp: profile_side(v, args, model_dir, tmp, env),
        lambda results: table(results, args),
    )


def run_point(args, side, render) -> dict:
    """`side(variant, model_dir, tmp)` for each of --variants (None: not available) at the
    point's checkpoint, written to a temporary folder; prints `render(results)`, writes --json."""
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = checkpoint(args.model, args.qwen_layers, Path(tmp))
        for v in args.variants:
            (Path(tmp) / v).mkdir()
            r = side(v, model_dir, Path(tmp) / v)
            if r is None:
                print(f"{v}: not available (see grid.py)", file=sys.stderr)
                continue
            results[v] = r
            print(f"{v}: {json.dumps(r)}", flush=True)
    print(render(results))
    out = {"point": vars(args) | {"json": None}, "results": results, "load": os.getloadavg()}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
