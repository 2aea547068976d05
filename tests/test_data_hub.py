"""Hub datasets through `datasets.load_dataset`, offline, from a `datasets` cache that the test
builds itself (the layout `load_dataset` leaves after a first, online load)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mlx_dpo.data import DataError, load_splits

datasets = pytest.importorskip("datasets")


def std_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: ", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


def make_datasets_cache(cache: Path, repo: str, config: str, splits: dict[str, list[dict]]):
    """Prepare `repo`'s `config` with datasets' own Parquet builder and put it where
    `load_dataset(repo)` looks when offline: CACHE/org___name/CONFIG/VERSION/HASH."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    src = cache / "_src" / repo / config
    src.mkdir(parents=True)
    files = {}
    for split, rows in splits.items():
        files[split] = str(src / f"{split}.parquet")
        pq.write_table(pa.Table.from_pylist(rows), files[split])
    name = repo.split("/")[1]
    builder = Parquet(
        cache_dir=str(cache / "_build"), dataset_name=name, config_name=config, data_files=files
    )
    builder.download_and_prepare()
    target = cache / repo.replace("/", "___") / config / "0.0.0" / "0123456789abcdef"
    shutil.copytree(builder.cache_dir, target)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    cache = tmp_path / "datasets"
    prefs = {"train_prefs": std_rows(5), "test_prefs": std_rows(2), "train_sft": std_rows(3)}
    make_datasets_cache(cache, "org/name", "default", prefs)
    make_datasets_cache(cache, "org/name", "harmless", {"train": std_rows(4)})
    bad = [*std_rows(5), {"prompt": "P", "chosen": "C", "rejected": None}]
    make_datasets_cache(cache, "org/bad", "default", {"train": bad})
    # datasets reads its environment once, at import: point its settings here for this test.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_dataset_splits_by_name(hub):
    with pytest.raises(DataError, match="several splits match split 'train'.*--data-split"):
        load_splits("org/name", data_config="default")  # train_prefs and train_sft
    rows = load_splits(
        "org/name", data_config="default", data_split="train=train_prefs,valid=test_prefs"
    )
    assert {k: len(v) for k, v in rows.items()} == {"train": 5, "valid": 2}
    assert rows["train"][-1]["source"] == "org/name[train_prefs]:row 4"
    assert rows["valid"][0] == {
        "prompt": "Q0: ", "chosen": "yes 0", "rejected": "no 0", "source": "org/name[test_prefs]:row 0"
    }  # fmt: skip
    assert rows.formats == {"standard": 7}


def test_hub_dataset_config(hub):
    rows = load_splits("org/name", data_config="harmless", valid_fraction=0)
    assert [r["source"] for r in rows["train"]] == [f"org/name[train]:row {i}" for i in range(4)]


def test_hub_dataset_bad_row_is_named_by_split_and_row(hub):
    with pytest.raises(DataError, match=r"^org/bad\[train\]:row 5: missing field 'rejected'"):
        load_splits("org/bad")
    rows = load_splits("org/bad", skip_invalid_rows=True, valid_fraction=0)
    assert len(rows["train"]) == 5
    assert [(p.source, p.reason) for p in rows.skipped] == [
        ("org/bad[train]:row 5", "missing field")
    ]


def test_hub_dataset_missing_offline_says_how_to_get_it(hub):
    with pytest.raises(DataError) as err:
        load_splits("org/other")
    message = str(err.value)
    assert message.startswith("org/other: no such local path")
    assert "not in the local `datasets` cache and downloads are off (HF_HUB_OFFLINE=1)" in message


def test_datasets_is_imported_only_for_hub_data():
    code = "import sys, mlx_dpo.cli, mlx_dpo.data; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
