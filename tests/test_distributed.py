"""Data-parallel training over MLX's own distributed layer (ring backend, 2 local processes)."""

import os
import shutil
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from tiny import read_metrics, write_pairs

pytestmark = pytest.mark.slow


def _train_args(model, data, run_dir, batch_size):
    return [
        "-m", "mlx_dpo", "train", "--model", str(model), "--data", str(data),
        "--adapter-path", str(run_dir), "--batch-size", str(batch_size), "--iters", "3",
        "--learning-rate", "1e-2", "--steps-per-report", "1", "--steps-per-eval", "3",
        "--num-layers", "-1", "--no-reference-cache", "--max-length", "64", "--seed", "5",
        # SGD: Adam divides by sqrt(v) and magnifies round-off in near-zero gradients
        "--optimizer", "sgd",
    ]  # fmt: skip


@pytest.mark.skipif(shutil.which("mlx.launch") is None, reason="mlx.launch is not on PATH")
def test_two_ring_processes_equal_one_process_with_the_same_global_batch(tiny_model_path, tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    write_pairs(data / "train.jsonl", 24)
    write_pairs(data / "valid.jsonl", 7, seed=1, offset=100)  # the last global batch partial
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    single = [sys.executable, *_train_args(tiny_model_path, data, tmp_path / "one", 4)]
    done = subprocess.run(single, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    launch = ["mlx.launch", "-n", "2", "--backend", "ring", "--", sys.executable]
    launch += _train_args(tiny_model_path, data, tmp_path / "two", 2)
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("iter 3 |") == 1  # only rank 0 reports
    one = mx.load(str(tmp_path / "one" / "adapters.safetensors"))
    two = mx.load(str(tmp_path / "two" / "adapters.safetensors"))
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(
            np.array(two[k]), np.array(one[k]), rtol=1e-4, atol=1e-6, err_msg=k
        )
    assert max(float(np.abs(np.array(v)).max()) for k, v in one.items() if k.endswith("lora_b")) > 0
    # the validation pass at the end: each rank scores its share of the 7 pairs, sums added up
    (valid_one,), (valid_two,) = (read_metrics(tmp_path / d, "valid") for d in ("one", "two"))
    for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen"):
        assert valid_two[k] == pytest.approx(valid_one[k], rel=1e-4, abs=1e-6), k
