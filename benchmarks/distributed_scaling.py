"""Pairs/s of `mlx_dpo train` on 1 process vs 2 local ring processes (same global batch).

    python benchmarks/distributed_scaling.py [--iters 30] [--hidden 256]

On a 2-core machine the two processes share the cores that one process already uses (MLX's
BLAS is multi-threaded), so this mostly proves the mechanism; the efficiency printed is
pairs/s(2 procs) / (2 * pairs/s(1 proc)) and is only meaningful across separate machines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny import build_tiny_model  # noqa: E402


def write_pairs(path: Path, n: int) -> None:
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Question {i}: yes or no?", "chosen": "Sure! Yes.", "rejected": "No."}
            f.write(json.dumps(row) + "\n")


def train(launcher: list[str], model: Path, data: Path, run: Path, batch: int, iters: int) -> float:
    cmd = [*launcher, sys.executable, "-m", "mlx_dpo", "train", "--model", str(model)]
    cmd += ["--data", str(data), "--adapter-path", str(run), "--batch-size", str(batch)]
    cmd += ["--iters", str(iters), "--steps-per-report", str(iters // 3), "--steps-per-eval", "0"]
    cmd += ["--no-reference-cache", "--max-length", "96", "--num-layers", "-1"]
    env = {
        **os.environ,
        "OPENBLAS_NUM_THREADS": "1" if launcher else os.environ.get("OPENBLAS_NUM_THREADS", ""),
    }
    subprocess.run(cmd, check=True, capture_output=True, env={k: v for k, v in env.items() if v})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"][1:]  # the first window includes compilation
    return sum(r["pairs_per_sec"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--global-batch", type=int, default=8)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    model = build_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=4)
    write_pairs(tmp / "data.jsonl", 256)
    one = train([], model, tmp / "data.jsonl", tmp / "one", args.global_batch, args.iters)
    launcher = ["mlx.launch", "-n", "2", "--backend", "ring", "--"]
    two = train(
        launcher, model, tmp / "data.jsonl", tmp / "two", args.global_batch // 2, args.iters
    )
    print(f"1 process : {one:8.2f} pairs/s")
    print(f"2 processes: {two:8.2f} pairs/s (ring backend, localhost)")
    print(f"scaling efficiency: {two / (2 * one):.0%} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
