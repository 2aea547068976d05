"""Ordinary faults during a run, through the real CLI in subprocesses on the bundled demo model:
kill -9 inside checkpoint and final writes, SIGTERM, two Ctrl-C, a concurrent run, corrupt
checkpoints, a full disk and a read-only directory. Each test asserts the end state: files,
exit code, the one-line message, and adapters equal to an uninterrupted run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo import demo

pytestmark = pytest.mark.slow
ITERS = 6


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = root / "data"
    data.mkdir()
    for split, n in (("train", 24), ("valid", 8)):
        lines = (demo.DATA_DIR / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    environ = {
        **os.environ,
        "MLX_DPO_CACHE": str(root / "cache"),  # one reference pass for the whole module
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {"root": root, "data": data, "environ": environ}


def args(env, run_dir, *extra) -> list[str]:
    return [
        sys.executable, "-m", "mlx_dpo", "train",
        "--model", str(demo.MODEL_DIR), "--data", str(env["data"]),
        "--adapter-path", str(run_dir), "--iters", str(ITERS), "--save-every", "2",
        "--batch-size", "2", "--steps-per-report", "1", "--steps-per-eval", "0",
        "--max-length", "64", "--learning-rate", "1e-3", "--no-demo-summary", *extra,
    ]  # fmt: skip


def train(env, run_dir, *extra, extra_env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run(
        args(env, run_dir, *extra),
        env={**env["environ"], **(extra_env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(env, run_dir, *extra, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(
        args(env, run_dir, *extra),
        env={**env["environ"], **(extra_env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def paused(env, run_dir, point: str, *extra) -> subprocess.Popen:
    """A run stopped at a test hook (see mlx_dpo/_testhooks.py), ready to be killed there."""
    marker = env["root"] / f"paused-{run_dir.name}"
    marker.unlink(missing_ok=True)
    hook = {"MLX_DPO_TEST_PAUSE": point, "MLX_DPO_TEST_PAUSE_FILE": str(marker)}
    proc = start(env, run_dir, *extra, extra_env=hook)
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the run never reached the hook"
        time.sleep(0.1)
    return proc


def wait_for_line(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"{text!r} never printed:\n{''.join(lines)}")


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def adapters(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / "adapters.safetensors")).items()}


def assert_same_adapters(a: Path, b: Path) -> None:
    x, y = adapters(a), adapters(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-6, atol=1e-6, err_msg=k)


def metric_steps(run_dir: Path, split="train") -> list[int]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == split]


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*tmp*"))


def files(run_dir: Path) -> dict:
    """Every file's bytes, but the lock's (it holds the PID of the last process to lock it)."""
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


@pytest.fixture(scope="module")
def uninterrupted(env) -> Path:
    run_dir = env["root"] / "uninterrupted"
    result = train(env, run_dir)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_kill9_inside_a_checkpoint_write_then_resume(env, uninterrupted):
    run_dir = env["root"] / "kill-ckpt"
    kill9(paused(env, run_dir, "checkpoint-write:4"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "0000002"
    assert (run_dir / "checkpoints" / ".0000004.tmp").is_dir()  # the write that was cut
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    assert_same_adapters(run_dir, uninterrupted)
    assert leftovers(run_dir) == []
    assert metric_steps(run_dir) == list(range(1, ITERS + 1))


@pytest.mark.parametrize("delay", [0.9, 2.3])  # fixed "random" moments: mid-update, mid-sleep
def test_kill9_at_any_moment_then_resume_equals_uninterrupted(env, uninterrupted, delay):
    run_dir = env["root"] / f"kill-at-{delay}"
    proc = start(env, run_dir, extra_env={"MLX_DPO_TEST_SLOW": "0.4"})
    wait_for_line(proc, "iter 1 |")
    time.sleep(delay)
    kill9(proc)
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_adapters(run_dir, uninterrupted)
    assert leftovers(run_dir) == []
    assert metric_steps(run_dir) == list(range(1, ITERS + 1))


def test_kill9_in_the_final_adapters_write_is_healed(env, uninterrupted):
    run_dir = env["root"] / "kill-final"
    kill9(paused(env, run_dir, f"adapters-write:{ITERS}"))
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"{ITERS:07d}"
    assert leftovers(run_dir) == ["adapters.safetensors.tmp.safetensors"]
    rows_before = (run_dir / "metrics.jsonl").read_text()
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"is finished (step {ITERS})" in resumed.stdout
    assert "adapters.safetensors restored" in resumed.stdout
    assert_same_adapters(run_dir, uninterrupted)
    assert leftovers(run_dir) == []
    assert (run_dir / "metrics.jsonl").read_text() == rows_before  # nothing rerun or appended


def test_sigterm_saves_a_checkpoint_and_exits_143(env, uninterrupted):
    run_dir = env["root"] / "sigterm"
    proc = start(env, run_dir, extra_env={"MLX_DPO_TEST_SLOW": "0.5"})
    wait_for_line(proc, "iter 1 |")
    proc.send_signal(signal.SIGTERM)
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 143, out
    proc.stdout.close()
    step = int((run_dir / "checkpoints" / "latest").read_text())
    assert 1 <= step < ITERS and f"stopped by SIGTERM after step {step}" in out
    assert f"mlx_dpo train --resume --adapter-path {run_dir}" in out
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_adapters(run_dir, uninterrupted)
    assert metric_steps(run_dir) == list(range(1, ITERS + 1))


def test_a_second_ctrl_c_exits_at_once(env):
    run_dir = env["root"] / "two-ctrl-c"
    proc = start(env, run_dir, extra_env={"MLX_DPO_TEST_SLOW": "3"})
    wait_for_line(proc, "iter 1 |")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)  # the first handler has run (sleep is interrupted by the signal)
    t0 = time.time()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT  # the default action: killed by the signal
    assert time.time() - t0 < 2.5  # not after the 3 s update the first one waits for
    proc.stdout.close()


def test_ctrl_c_in_the_reference_pass_exits_130_and_leaves_no_directory(env):
    run_dir = env["root"] / "ctrl-c-reference"
    proc = paused(env, run_dir, "reference-pass", "--no-reference-cache")
    proc.send_signal(signal.SIGINT)
    out = proc.stdout.read()
    assert proc.wait(timeout=30) == 130, out
    proc.stdout.close()
    assert "stopped by SIGINT" in out and "Traceback" not in out
    assert not run_dir.exists()


def test_a_concurrent_run_is_refused_and_kill9_leaves_no_stale_lock(env):
    run_dir = env["root"] / "concurrent"
    first = paused(env, run_dir, "checkpoint-write:2")
    second = train(env, run_dir)
    assert second.returncode == 2
    assert error_lines(second) == [
        f"Error: --adapter-path {run_dir} is in use by another mlx_dpo process (PID {first.pid}); "
        "wait for it to finish or choose another --adapter-path"
    ]
    kill9(first)
    again = train(env, run_dir)  # the kernel dropped the lock; the cut run saved nothing
    assert again.returncode == 0, again.stderr


def test_corrupt_checkpoints_fall_back_to_the_newest_intact_one(env, uninterrupted):
    run_dir = env["root"] / "corrupt"
    shutil.copytree(uninterrupted, run_dir)
    newest = run_dir / "checkpoints" / f"{ITERS:07d}" / "adapters.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    (run_dir / "checkpoints" / "latest").write_text("0000099\n")  # pointing nowhere
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    warning = [line for line in resumed.stdout.splitlines() if line.startswith("warning: skip")]
    assert len(warning) == 1 and "checkpoints/latest" in warning[0]
    assert f"checkpoints/{ITERS:07d}" in warning[0] and "resuming from step 4" in warning[0]
    assert_same_adapters(run_dir, uninterrupted)
    assert metric_steps(run_dir) == list(range(1, ITERS + 1))


def test_no_intact_checkpoint_is_one_line_and_exit_2(env, uninterrupted):
    run_dir = env["root"] / "all-corrupt"
    shutil.copytree(uninterrupted, run_dir)
    for state in (run_dir / "checkpoints").glob("*/state.json"):
        state.write_text("{not json")
    before = files(run_dir)
    result = train(env, run_dir, "--resume")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (line,) = error_lines(result)
    assert "no intact checkpoint" in line and "0000004" in line and "0000006" in line
    assert files(run_dir) == before


def test_a_full_disk_mid_run_keeps_the_previous_checkpoint(env, uninterrupted):
    run_dir = env["root"] / "enospc"
    result = train(env, run_dir, extra_env={"MLX_DPO_TEST_FAIL": "checkpoint-write:4"})
    assert result.returncode == 2, result.stderr
    (line,) = error_lines(result)
    assert "No space left on device" in line and "previous checkpoint is intact" in line
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "0000002"
    assert leftovers(run_dir) == []  # the partial temporary directory is gone
    resumed = train(env, run_dir, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_adapters(run_dir, uninterrupted)


def _mount_tmpfs(path: Path, options: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)])
    return done.returncode == 0


def test_a_read_only_directory_is_refused_before_the_model_loads(env):
    target = env["root"] / "readonly"
    if not _mount_tmpfs(target, "ro,size=1m"):
        if os.geteuid() == 0:
            pytest.skip("needs a read-only mount (root) or a non-root user")
        target.chmod(0o555)
    try:
        result = train(env, target / "run")
    finally:
        subprocess.run(
            ["umount", "-l", str(target)], capture_output=True
        )  # lazy: arrays may map files
    assert result.returncode == 2
    (line,) = error_lines(result)
    assert "cannot write there" in line and ("read-only" in line or "permission" in line)
    assert "reference log-probs" not in result.stdout  # refused before any long work


def test_a_really_full_disk_leaves_an_intact_checkpoint(env):
    target = env["root"] / "small-disk"
    if not _mount_tmpfs(target, "size=1200k"):  # room for the model's first few checkpoints
        pytest.skip("needs root to mount a small tmpfs")
    try:
        result = train(env, target / "run", "--save-every", "1")
        assert result.returncode == 2, result.stderr
        (line,) = error_lines(result)
        assert "No space left on device" in line
        from mlx_dpo import checkpoint

        ckpt = checkpoint.load(target / "run")
        assert ckpt is not None and ckpt.skipped == [] and ckpt.step >= 1
        assert leftovers(target / "run") == []
    finally:
        subprocess.run(
            ["umount", "-l", str(target)], capture_output=True
        )  # lazy: arrays may map files
