"""What a run directory accepts, in process (fast): resume checks against the run's identity,
foreign files, non-finite parameters, unreadable adapters and reference caches."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner

from mlx_dpo import checkpoint, demo, reference, trainer
from mlx_dpo.cli import main


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("lifecycle-data")
    for split, n in (("train", 12), ("valid", 4)):
        lines = (demo.DATA_DIR / f"{split}.jsonl").read_text().splitlines()[:n]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return data


def flags(data: Path, run_dir: Path, *extra) -> list[str]:
    return [
        "train", "--model", str(demo.MODEL_DIR), "--data", str(data),
        "--adapter-path", str(run_dir), "--iters", "2", "--save-every", "1",
        "--batch-size", "2", "--steps-per-eval", "0", "--max-length", "64", "--steps-per-report", "1",
        "--no-demo-summary", "--learning-rate", "1e-3", *extra,
    ]  # fmt: skip


def cli(*args):
    return CliRunner().invoke(main, list(args))


def files(run_dir: Path) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(small_data, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lifecycle") / "run"
    result = cli(*flags(small_data, run_dir))
    assert result.exit_code == 0, result.output
    return run_dir


def test_resume_with_another_rank_is_refused_and_changes_nothing(
    small_data, finished_run, tmp_path
):
    before = files(finished_run)
    line = error_line(cli(*flags(small_data, finished_run, "--resume", "--lora-rank", "16")))
    assert "lora_rank: saved 8, given 16" in line
    assert files(finished_run) == before
    # the saved adapters still load as the run's config says (mlx-lm reads them)
    import mlx_lm

    mlx_lm.load(str(demo.MODEL_DIR), adapter_path=str(finished_run))


def test_changed_learning_rate_needs_allow_changes_and_is_recorded(small_data, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    assert cli(*flags(small_data, run_dir)).exit_code == 0
    before = files(run_dir)
    longer = flags(small_data, run_dir, "--resume", "--iters", "3", "--learning-rate", "2e-3")
    line = error_line(cli(*longer))
    assert "learning_rate: saved 0.001, given 0.002" in line and "--allow-changes" in line
    assert files(run_dir) == before
    result = cli(*longer, "--allow-changes")
    assert result.exit_code == 0, result.output
    changes = json.loads((run_dir / "run.json").read_text())["changes"]
    assert changes == [{"step": 2, "changes": {"learning_rate": {"saved": 1e-3, "given": 2e-3}}}]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in rows] == [
        ("train", 1),
        ("train", 2),
        ("change", 2),
        ("train", 3),
    ]
    # changed data is refused too (the content hash of the tokenized pairs)
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    with open(other / "train.jsonl", "a") as f:
        f.write((demo.DATA_DIR / "train.jsonl").read_text().splitlines()[50] + "\n")
    more = flags(other, run_dir, "--resume", "--iters", "4", "--learning-rate", "2e-3")
    line = error_line(cli(*more))
    assert "data_hash" in line and "data:" in line


def test_resume_takes_the_runs_settings(finished_run):
    result = cli("train", "--resume", "--adapter-path", str(finished_run))
    assert result.exit_code == 0, result.output
    assert "is finished (step 2)" in result.output


def test_a_directory_with_foreign_files_is_refused(small_data, tmp_path):
    run_dir = tmp_path / "peft"
    run_dir.mkdir()
    (run_dir / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (run_dir / "adapter_model.safetensors").write_bytes(b"weights")
    before = files(run_dir)
    line = error_line(cli(*flags(small_data, run_dir)))
    assert "not an mlx_dpo run" in line and "adapter_model.safetensors" in line
    assert files(run_dir) == before


def test_non_finite_parameters_are_never_saved(small_data, tmp_path, monkeypatch):
    # An infinite step size: the gradient norm before the update is finite, the weights after
    # it are not. The check must look at what is about to be saved.
    monkeypatch.setattr(trainer, "build_optimizer", lambda cfg, total: optim.SGD(float("inf")))
    run_dir = tmp_path / "nan"
    result = cli(*flags(small_data, run_dir))
    assert result.exit_code == 1 and "NaN/inf at step 1" in result.output
    assert not (run_dir / "adapters.safetensors").exists()
    assert not any((run_dir / "checkpoints").glob("0*"))


def test_checkpoint_save_refuses_non_finite_arrays(tmp_path):
    with pytest.raises(checkpoint.NonFiniteParameters):
        checkpoint.save(tmp_path, 1, {"a": mx.array([1.0, float("nan")])}, {}, {})
    assert not (tmp_path / "adapters.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
@pytest.mark.parametrize("command", ["eval", "compare", "fuse"])
def test_bad_adapters_file_is_one_line(finished_run, tmp_path, damage, command):
    import shutil

    run_dir = tmp_path / "damaged"
    shutil.copytree(finished_run, run_dir)
    file = run_dir / "adapters.safetensors"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:500])
    else:
        mx.save_safetensors(str(file), {"model.layers.0.other.weight": mx.zeros((2, 2))})
    extra = {"eval": [], "compare": ["--num-prompts", "1"], "fuse": ["--output", "fused"]}
    args = [command, "--adapter-path", str(run_dir), *extra[command]]
    with CliRunner().isolated_filesystem(temp_dir=tmp_path):
        line = error_line(cli(*args))
        assert not Path("fused").exists()
    assert "adapters.safetensors" in line
    assert ("unreadable" if damage == "truncated" else "not adapters of this model") in line


def test_a_truncated_reference_cache_is_recomputed(tmp_path):
    path = tmp_path / "cache.npz"
    np.savez(path, chosen=np.zeros(3, np.float32), rejected=np.ones(3, np.float32))
    assert reference._read_cache(path, 3, print) is not None
    path.write_bytes(path.read_bytes()[:100])
    said = []
    assert reference._read_cache(path, 3, said.append) is None
    assert len(said) == 1 and "recomputing" in said[0]
