"""The README's first command in a fresh virtual environment: `pip install .` (no extras, no
system packages) gives a working console script, the demo model and data as package data, and
on Linux x86_64 a fast BLAS from the `mkl` wheel, with any system OpenBLAS hidden
(MLX_DPO_NO_SYSTEM_BLAS=1), so what a newcomer without one gets is what is checked."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # the README's `pip install .`, run from the checkout
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "."]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=1800, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv


def run(venv: Path, *args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLX_DPO_NO_")}
    environment.update(env)
    exe = str(venv / "bin" / "mlx_dpo")
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, env=environment)


def test_non_editable_install_in_a_fresh_venv(venv, tmp_path):
    version = run(venv, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("mlx_dpo, version"), version.stderr
    helped = run(venv, "train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "--adapter-path" in helped.stdout, helped.stderr
    # the demo's files come from site-packages, not from this checkout
    checked = run(venv, "data", "check", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "site-packages" in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlx_dpo.demo as d; print(d.MODEL_DIR)"],
        capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.machine() == "x86_64"),
    reason="the mkl wheel is a dependency on Linux x86_64 only",
)
def test_the_install_alone_brings_a_fast_blas(venv, tmp_path):
    doctor = run(venv, "doctor", cwd=tmp_path, MLX_DPO_NO_SYSTEM_BLAS="1")
    assert doctor.returncode == 0, doctor.stderr
    blas = next(line for line in doctor.stdout.splitlines() if line.startswith("blas:"))
    assert "MKL from the mkl wheel" in blas and str(venv) in blas, doctor.stdout
    print(doctor.stdout)  # the matmul rate it measured, for the log
    # the opt-out still works
    off = run(venv, "doctor", cwd=tmp_path, MLX_DPO_NO_FAST_BLAS="1")
    assert "disabled by MLX_DPO_NO_FAST_BLAS" in off.stdout, off.stdout
