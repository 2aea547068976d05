"""Paths a run stores and the data `eval` scores: a run started with relative paths works from
any directory afterwards; `eval --data FILE` scores every row of FILE; rows skipped while
training are listed in the run; the reference cache is keyed on content, not file times."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.config import TrainConfig
from mlx_dpo.reference import fingerprint_dir


def pair(i: int) -> dict:
    a, b = 1 + i % 5, 2 + i // 5
    return {"prompt": f"What is {a} plus {b}? ", "chosen": f"It is {a + b}.", "rejected": "No."}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_path, tmp_path_factory):
    """A 2-step run started inside its folder with relative --model, --data, --adapter-path,
    on data with one invalid row (skipped with --skip-invalid-rows)."""
    from mlx_dpo.run import run_training

    root = tmp_path_factory.mktemp("relative-run")
    shutil.copytree(tiny_model_path, root / "models" / "tiny")
    rows = [pair(i) for i in range(20)]
    rows[7] = {"prompt": "P ", "chosen": "C"}  # no rejected
    write_jsonl(root / "pairs.jsonl", rows)
    cfg = TrainConfig(
        model="models/tiny",
        data="pairs.jsonl",
        adapter_path="run",
        skip_invalid_rows=True,
        iters=2,
        batch_size=2,
        steps_per_eval=10,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLX_DPO_CACHE", str(root / "cache"))
        run_training(cfg, log=lambda *_: None)
    return root


def test_adapter_config_stores_absolute_local_paths(run):
    config = json.loads((run / "run" / "adapter_config.json").read_text())
    assert config["model"] == str(run / "models" / "tiny")
    assert config["data"] == str(run / "pairs.jsonl")
    assert config["ref_model"] is None and config["init_adapter"] is None


def test_skipped_rows_are_listed_in_the_run(run):
    lines = (run / "run" / "skipped_rows.jsonl").read_text().splitlines()
    (row,) = [json.loads(line) for line in lines]
    assert row["source"].endswith("pairs.jsonl:8") and row["reason"] == "missing field"


def test_eval_from_another_directory_and_every_row_of_data_given(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the run's relative paths would not resolve from here
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))
    adapter = str(run / "run")
    result = CliRunner().invoke(main, ["eval", "--adapter-path", adapter, "--json"])
    assert result.exit_code == 0, result.output
    held_out = json.loads(result.output.strip().splitlines()[-1])
    # the run's own data: its held-out slice (5% of the 19 valid rows, at least 1)
    assert held_out["split"] == "valid" and held_out["pairs"] == 1
    other = write_jsonl(tmp_path / "other.jsonl", [pair(i) for i in range(30, 36)])
    result = CliRunner().invoke(
        main, ["eval", "--adapter-path", adapter, "--data", "other.jsonl", "--json"]
    )
    assert result.exit_code == 0, result.output
    scored = json.loads(result.output.strip().splitlines()[-1])
    assert scored["pairs"] == 6 and other.exists()  # every row of the file given


def test_reference_cache_key_follows_content_not_file_times(tiny_model_path, tmp_path):
    before = fingerprint_dir(tiny_model_path)
    copy = shutil.copytree(tiny_model_path, tmp_path / "copy")
    for f in copy.iterdir():
        os.utime(f, (1, 1))  # as a reinstall or a touch would change them
    assert fingerprint_dir(copy) == before
    weights = copy / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(raw))
    assert fingerprint_dir(copy) != before


def test_big_weight_files_are_keyed_by_header_and_samples(tmp_path, monkeypatch):
    from mlx_dpo import reference

    monkeypatch.setattr(reference, "WHOLE_FILE_BYTES", 1 << 10)
    monkeypatch.setattr(reference, "SAMPLE_BYTES", 16)
    path = tmp_path / "w.safetensors"
    data = bytearray(range(256)) * 64  # 16 KiB
    path.write_bytes(bytes(data))
    first = reference.fingerprint_file(path)
    data[8200] ^= 1  # in the sampled middle: seen
    path.write_bytes(bytes(data))
    assert reference.fingerprint_file(path) != first
    data[8000] ^= 1  # between samples: not seen (the price of not reading GBs)
    path.write_bytes(bytes(data))
    second = reference.fingerprint_file(path)
    data[0:8] = (4).to_bytes(8, "little")  # a 4-byte safetensors header, hashed whole
    path.write_bytes(bytes(data))
    assert reference.fingerprint_file(path) not in (first, second)
