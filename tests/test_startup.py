"""`mlx_dpo --help`, `train --help` and a mistake in a flag, a config file or a path answer
without importing MLX, mlx-lm or transformers (importing those takes seconds; a user who
mistyped a flag should not wait for them). The wall time of each is printed, not asserted:
`python -m pytest -s tests/test_startup.py` shows it."""

import json
import subprocess
import sys
import time

import pytest

HEAVY = ("mlx.core", "mlx_lm", "transformers", "torch")
# Runs the CLI and reports, at exit, which heavy modules the process had imported.
PROBE = f"""
import atexit, json, sys
atexit.register(lambda: print("HEAVY=" + json.dumps(
    [m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr))
from mlx_dpo.cli import main
sys.argv = ["mlx_dpo", *sys.argv[1:]]
main()
"""

CASES = [
    (["--help"], 0, "Usage: mlx_dpo"),
    (["train", "--help"], 0, "--adapter-path"),
    (["eval", "--help"], 0, "[default: the run's]"),
    (["train", "--bogus"], 2, "No such option"),
    (["train", "--beta", "-1"], 2, "beta must be > 0"),
    (["train", "--loss-type", "nope"], 2, "loss_type must be one of"),
    (["train", "--label-smoothing", "0.1", "--loss-type", "ipo"], 2, "label_smoothing only"),
    (["train", "--config", "{tmp}/missing.yaml"], 2, "config file not found"),
    (["eval", "--adapter-path", "{tmp}/missing"], 2, "no such directory"),
    (["compare", "--adapter-path", "{tmp}/missing", "--prompts", "p.txt"], 2, "no such directory"),
    (["fuse", "--adapter-path", "{tmp}/missing", "--output", "{tmp}/out"], 2, "no such directory"),
    (["data", "check", "--data", "{tmp}/missing.jsonl"], 2, "missing.jsonl"),
]


@pytest.mark.parametrize(("args", "status", "says"), CASES, ids=lambda v: str(v))
def test_fast_answers_import_nothing_heavy(args, status, says, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=tmp_path
    )
    seconds = time.perf_counter() - start
    print(f"mlx_dpo {' '.join(args)}: exit {done.returncode} in {seconds:.2f} s")
    assert done.returncode == status, done.stderr[-2000:]
    assert says in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    heavy = json.loads(done.stderr.rsplit("HEAVY=", 1)[1].splitlines()[0])
    assert heavy == [], f"imported {heavy} before answering"


def test_loss_rules_name_every_loss():
    """The MLX-free option rules and the loss functions list the same loss types."""
    from mlx_dpo.loss_options import F_DIVERGENCE_TYPES, LOSS_TYPES
    from mlx_dpo.loss_types import F_DIVERGENCES, LOSSES

    assert sorted(LOSS_TYPES) == sorted(LOSSES)
    assert sorted(F_DIVERGENCE_TYPES) == sorted(F_DIVERGENCES)


BLAS_PROBE = """
import json, os
import mlx_dpo
from mlx_dpo import _blas
keys = ("MKL_THREADING_LAYER", "OMP_WAIT_POLICY")
print(json.dumps({"kind": _blas.STATE.kind, "reason": _blas.STATE.reason,
                  **{k: os.environ.get(k) for k in keys}}))
"""


def blas_state(**env: str) -> dict:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLX_DPO_NO_", "MKL_"))}
    environment.pop("OMP_WAIT_POLICY", None)
    done = subprocess.run(
        [sys.executable, "-c", BLAS_PROBE],
        capture_output=True,
        text=True,
        env={**environment, **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the preload is Linux-only")
def test_blas_switches():
    import ctypes.util

    assert "disabled by MLX_DPO_NO_FAST_BLAS" in blas_state(MLX_DPO_NO_FAST_BLAS="1")["reason"]
    wheel = blas_state(MLX_DPO_NO_SYSTEM_BLAS="1")
    if wheel["kind"] is None:
        pytest.skip("no mkl wheel in this environment")
    assert wheel["kind"] == "mkl" and "mkl wheel" in wheel["reason"]
    if ctypes.util.find_library("gomp"):  # MKL on GNU OpenMP, its wait policy left as it is
        assert (wheel["MKL_THREADING_LAYER"], wheel["OMP_WAIT_POLICY"]) == ("GNU", None)
    else:
        assert wheel["MKL_THREADING_LAYER"] == "SEQUENTIAL"
    mine = blas_state(MLX_DPO_NO_SYSTEM_BLAS="1", MKL_THREADING_LAYER="SEQUENTIAL")
    assert mine["MKL_THREADING_LAYER"] == "SEQUENTIAL"  # the user's setting wins
