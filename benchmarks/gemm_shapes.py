"""Where the GEMM time of one update goes, by call shape and by the part of the model it serves.

python benchmarks/gemm_shapes.py --model smollm2-135m --length 128 --pairs 2 [--variants mlx_dpo
  mlx-lm-lora] [--steps 6] [--top 15] [--threads 1] [--json OUT]

profile_point.py says how much of an update the BLAS takes; this says which matmuls. It compiles
benchmarks/gemmlog.c (an LD_PRELOAD interposer that times every `cblas_sgemm` by its shape) with
the C compiler and runs each side's grid worker under it, as profile_point does under `perf`:
once with 2 warm-up updates and 1 timed, once with 2 and --steps; the difference is --steps - 1
steady updates. Each shape is put to a role from the model's dimensions, in this order: LoRA
(a side of rank 8), the output layer (a side of the vocabulary), the frozen projections (two
sides among hidden, intermediate and the q/k/v widths), attention (a side of the head
dimension), the output layer's vocabulary tiles (hidden by anything else). Sides whose BLAS is
reached through `cblas_sgemm`: mlx_dpo's variants and mlx-lm-lora (not torch, which links its
BLAS inside). Linux only.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from grid import LORA_RANK, command, model_spec  # noqa: E402
from profile_point import point_parser, run_point, worker_env  # noqa: E402

ROLES = (f"LoRA (rank {LORA_RANK})", "output layer", "attention", "frozen projections", "other")
TRANSPOSE = {111: "N", 112: "T"}  # CBLAS_TRANSPOSE


def build_shim(tmp: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("gemm_shapes: needs a C compiler (apt install gcc)")
    out = tmp / "gemmlog.so"
    subprocess.run(
        [cc, "-O2", "-shared", "-fPIC", "-o", str(out), str(HERE / "gemmlog.c"), "-ldl"],
        check=True,
    )
    return out


def read_log(path: Path) -> dict[str, tuple[float, float]]:
    """{shape key: (calls, seconds)} from the interposer's log. The key is 'ta tb M N K lda
    ldb beta' as written; a missing log (no GEMM ran) is empty."""
    out: dict[str, tuple[float, float]] = {}
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        *key, calls, seconds = line.split()
        out[" ".join(key)] = (float(calls), float(seconds))
    return out


def shapes_per_update(long: dict, short: dict, updates: int) -> dict[str, tuple[float, float]]:
    """(calls, seconds) per update of each shape: the long run less the short one."""
    out = {}
    for key, (calls, secs) in long.items():
        calls0, secs0 = short.get(key, (0.0, 0.0))
        if calls > calls0:
            out[key] = ((calls - calls0) / updates, (secs - secs0) / updates)
    return out


def mnk(key: str) -> tuple[int, int, int]:
    """A shape key's M, N and K."""
    m, n, k = (int(x) for x in key.split()[2:5])
    return m, n, k


def role(key: str, spec) -> str:
    """Which part of the model a GEMM of this shape serves (by its dimensions alone)."""
    dims = mnk(key)
    hd = spec.head_dim
    projections = {
        spec.hidden_size,
        spec.intermediate_size,
        spec.num_attention_heads * hd,
        spec.num_key_value_heads * hd,
    }
    if LORA_RANK in dims:
        return ROLES[0]
    if spec.vocab_size in dims:
        return ROLES[1]
    if sum(d in projections for d in dims) >= 2:
        return ROLES[3]
    if hd in dims and hd not in projections:
        return ROLES[2]
    if spec.hidden_size in dims:  # the lean head's vocabulary tiles (logps.py): hidden x a tile
        return ROLES[1]
    return ROLES[4]


def flops(key: str) -> int:
    m, n, k = mnk(key)
    return 2 * m * n * k


def by_role(shapes: dict[str, tuple[float, float]], spec) -> dict[str, dict[str, float]]:
    out = {r: {"calls": 0.0, "seconds": 0.0, "flops": 0.0} for r in ROLES}
    for key, (calls, secs) in shapes.items():
        cell = out[role(key, spec)]
        cell["calls"] += calls
        cell["seconds"] += secs
        cell["flops"] += calls * flops(key)
    return {r: c for r, c in out.items() if c["calls"] > 0}


def gemm_side(variant: str, args, model_dir: Path, shim: Path, tmp: Path, env: dict):
    def cmd(steps: int) -> list[str] | None:
        ns = argparse.Namespace(
            warmup=2, steps=steps, bench_python=args.bench_python, threads=args.threads
        )
        return command(variant, model_dir, args.length, args.pairs, "fp32", ns, tmp / "out.json")

    def run(steps: int, log: Path | None) -> None:
        extra = {"LD_PRELOAD": str(shim), "GEMMLOG": str(log)} if log else {}
        proc = subprocess.run(cmd(steps), env={**env, **extra}, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"gemm_shapes: {variant} failed:\n{proc.stderr[-1500:]}")

    if cmd(1) is None:
        return None  # this side cannot run here (no benchmark venv)
    run(1, None)  # unlogged first: kernel timing, MLX's JIT compiles and disk caches land here
    run(1, tmp / "short.log")
    run(args.steps, tmp / "long.log")
    step_s = json.loads((tmp / "out.json").read_text())["step_s_min"]
    shapes = shapes_per_update(
        read_log(tmp / "long.log"), read_log(tmp / "short.log"), args.steps - 1
    )
    return {"step_s": step_s, "shapes": shapes}


def table(results: dict, spec, top: int) -> str:
    lines = []
    for variant, r in results.items():
        roles = by_role(r["shapes"], spec)
        total = sum(c["seconds"] for c in roles.values())
        lines += [
            f"{variant}: {r['step_s']:.3f} s/update, of it GEMMs {total:.3f} s",
            "",
            "| role | calls/update | ms/update | share of GEMM time | GFLOP/s |",
            "|---|---|---|---|---|",
        ]
        for name, c in roles.items():
            rate = c["flops"] / max(c["seconds"], 1e-12) / 1e9
            share = c["seconds"] / max(total, 1e-12)
            lines.append(
                f"| {name} | {c['calls']:.0f} | {c['seconds'] * 1e3:.1f} | {share:.0%} | {rate:.0f} |"
            )
        lines += [
            "",
            "| role | op | M x N x K | calls/update | us/call | ms/update | GFLOP/s |",
            "|---|---|---|---|---|---|---|",
        ]
        costly = sorted(r["shapes"].items(), key=lambda kv: -kv[1][1])[:top]
        for key, (calls, secs) in costly:
            ta, tb = (int(x) for x in key.split()[:2])
            m, n, k = mnk(key)
            op = TRANSPOSE.get(ta, "?") + TRANSPOSE.get(tb, "?")
            lines.append(
                f"| {role(key, spec)} | {op} | {m} x {n} x {k} | {calls:.0f} | "
                f"{secs / calls * 1e6:.0f} | {secs * 1e3:.1f} | {flops(key) * calls / secs / 1e9:.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = point_parser(__doc__.splitlines()[0], steps=6)
    p.add_argument("--top", type=int, default=15, help="the N costliest shapes per side")
    args = p.parse_args(argv)
    if sys.platform != "linux":
        raise SystemExit("gemm_shapes: Linux only (it preloads an interposer with LD_PRELOAD)")
    env = worker_env(args.threads)
    spec = model_spec(args.model, args.qwen_layers)
    with tempfile.TemporaryDirectory() as shim_dir:
        shim = build_shim(Path(shim_dir))
        return run_point(
            args,
            lambda v, model_dir, tmp: gemm_side(v, args, model_dir, shim, tmp, env),
            lambda results: table(results, spec, args.top),
        )


if __name__ == "__main__":
    main()
