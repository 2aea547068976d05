"""A plain (non-editable) install into a fresh virtual environment works: the console script,
its version, and the demo model and data shipped as package data."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]


def test_non_editable_install_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT)]
    done = subprocess.run(pip, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    exe = str(venv / "bin" / "mlx_dpo")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("mlx_dpo, version"), version.stderr
    helped = subprocess.run([exe, "train", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert helped.returncode == 0 and "--adapter-path" in helped.stdout, helped.stderr
    # the demo's files come from site-packages, not from this checkout
    checked = subprocess.run([exe, "data", "check"], capture_output=True, text=True, cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "site-packages" in subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import mlx_dpo.demo as d; print(d.MODEL_DIR)"],
        capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip
