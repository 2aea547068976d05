"""Reading preference rows: local files and directories, and Hugging Face Hub datasets.

`load_splits` turns `--data` into `Splits`: normalized rows per split (see `mlx_dpo.formats`
for the row formats and how each is detected), plus which formats were seen and which rows
were skipped and why. Tokenization lives in `mlx_dpo.data`.

Where rows come from (`data`):
- a file: `.jsonl`, `.json` (an array of objects, or JSON Lines), `.parquet`, and `.jsonl`/
  `.json` compressed (`.gz`, `.bz2`, `.xz`, `.zst`). It is the train split.
- a directory: split files found by Hugging Face conventions (`find_split_files`).
- a Hugging Face dataset id `org/name`: loaded with `datasets.load_dataset` (its cache,
  `HF_HUB_OFFLINE`, revisions, configs, `data_dir`, README `configs:` metadata), then checked
  row by row with the Hub row index as the location (`org/name[train_prefs]:row 17`).

Rows that cannot be used are handled in two ways. Structural problems (malformed JSON, not
UTF-8, wrong types, missing fields) fail the load with every problem listed (the first
MAX_SHOWN, then the true count of the rest), unless `skip_invalid_rows`: then they are
skipped, but more than half of the rows invalid still fails (a wrong mapping, not dirty
data). Rows without a preference signal (both answers empty, chosen == rejected, a score
margin under `min_score_margin`) are always skipped and counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from mlx_dpo.data_files import (
    DATA_SUFFIXES,
    SPLIT_KEYWORDS,
    DataError,
    find_split_files,
    match_splits,
    read_records,
    split_keywords,
)
from mlx_dpo.formats import FORMAT_NAMES, Problem, common_prefix_length, detect, normalize_row

__all__ = ["DataError", "Splits", "capped", "common_prefix_length", "load_splits"]

MAX_SHOWN = 10  # problems listed before "... and N more"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def capped(problems: list, where: str, hint: str = "", shown: int = MAX_SHOWN) -> list[str]:
    """The first `shown` problems, then one line with the true count of the rest; `hint` goes
    on that last line (or its own), so the whole is at most `shown` + 1 lines."""
    lines = [str(p) for p in problems]
    if len(lines) > shown:
        lines = lines[:shown] + [f"... and {len(lines) - shown} more problems in {where}"]
    if hint and len(lines) > shown:
        lines[-1] += f" {hint}"
    elif hint:
        lines.append(hint)
    return lines


class Splits(dict):
    """`{split: rows}`, with what was learned reading them: `formats` (rows per detected
    format), `hh_messages` (HH transcripts parsed into messages), `skipped` (a `Problem` per
    row left out)."""

    def __init__(self, rows=(), *, formats=None, hh_messages=False, skipped=None):
        super().__init__(rows)
        self.formats: Counter = formats or Counter()
        self.hh_messages = hh_messages
        self.skipped: list[Problem] = skipped or []

    def format_line(self) -> str:
        """The detected format(s), most rows first."""
        parts = []
        for fmt, n in self.formats.most_common():
            name = FORMAT_NAMES.get(fmt, fmt)
            if fmt == "hh":
                name += " as chat messages" if self.hh_messages else " as plain text"
            parts.append(f"{name} ({n} rows)")
        return "format: " + ("; ".join(parts) or "no rows")


def skip_counts(skipped: list[Problem]) -> str:
    """Skipped rows counted per reason: "3 missing field, 1 both answers empty"."""
    return ", ".join(
        f"{n} {reason}" for reason, n in Counter(p.reason for p in skipped).most_common()
    )


def write_skipped(path: str | Path, skipped: list[Problem]) -> Path:
    """Every skipped row's source, reason and message, one JSON object a line."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for p in skipped:
            row = {"source": p.source, "reason": p.reason, "problem": p.message}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


# ---------------------------------------------------------------------------------------------
# Hub datasets through `datasets`


def load_hub_records(
    repo_id: str,
    keywords: dict[str, tuple[str, ...]],
    *,
    config: str | None,
    data_dir: str | None,
    revision: str | None,
) -> dict[str, list[tuple[str, Any]]]:
    """`{split: [(source, record)]}` of a Hub dataset, loaded with `datasets.load_dataset`."""
    try:
        import datasets  # imported here: ~1 s that commands without Hub data do not pay
    except ImportError:
        raise DataError(
            f"{repo_id}: reading Hub datasets needs the `datasets` package (pip install datasets)"
        ) from None
    at = f" at revision {revision}" if revision else ""
    try:
        loaded = datasets.load_dataset(repo_id, name=config, data_dir=data_dir, revision=revision)
    except (ConnectionError, FileNotFoundError) as e:
        offline = datasets.config.HF_HUB_OFFLINE
        why = "downloads are off (HF_HUB_OFFLINE=1)" if offline else _first_line(e)
        raise DataError(
            f"{repo_id}: no such local path, and dataset{at} could not be loaded: it is not in "
            f"the local `datasets` cache and {why}; load it once with network access, check the "
            "id, log in (`hf auth login`) if it is gated, or pass a local path"
        ) from None
    except ValueError as e:  # unknown config, bad data_dir, ...
        raise DataError(f"{repo_id}: {_first_line(e)}") from None
    names = [Path(n) for n in loaded]
    found = match_splits(names, keywords, repo_id, kind="splits")
    if not found and len(names) == 1 and "train" in keywords:
        found["train"] = names  # a dataset with one split of another name
    out = {}
    for split, matched in found.items():
        (name,) = matched[:1]
        rows = loaded[str(name)].to_list()
        out[split] = [(f"{repo_id}[{name}]:row {i}", r) for i, r in enumerate(rows)]
    return out


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ---------------------------------------------------------------------------------------------
# load_splits


def read_split_records(
    data: str,
    keywords: dict[str, tuple[str, ...]],
    *,
    config: str | None,
    data_dir: str | None,
    revision: str | None,
) -> tuple[dict[str, list[tuple[str, Any]]], list[Problem]]:
    """Raw `(source, record)`s of each split found in `data`, and the read problems."""
    path = Path(data).expanduser()
    if path.is_file():
        files = {"train": [(path, data)]}
    elif path.is_dir():
        root = path / data_dir if data_dir else path
        found = find_split_files(root, keywords, config, data)
        files = {
            s: [(root / f, str(Path(data) / (data_dir or "") / f)) for f in fs]
            for s, fs in found.items()
        }
    elif _HUB_ID.match(data) and not data.lower().endswith(DATA_SUFFIXES):
        return load_hub_records(
            data, keywords, config=config, data_dir=data_dir, revision=revision
        ), []
    else:
        raise DataError(
            f"{data}: no such file or directory; --data takes a directory with train.jsonl/"
            "valid.jsonl, a .jsonl/.json/.parquet file (or .jsonl.gz, .json.gz, .jsonl.zst), "
            "or a Hugging Face dataset id (org/name)"
        )
    records, problems = {}, []
    for split, split_files in files.items():
        records[split] = []
        for file, name in split_files:
            file_records, file_problems = read_records(file, name)
            records[split] += file_records
            problems += file_problems
    return records, problems


def load_splits(
    data: str,
    *,
    splits: tuple[str, ...] = ("train", "valid", "test"),
    prompt_field: str = "prompt",
    chosen_field: str = "chosen",
    rejected_field: str = "rejected",
    valid_fraction: float = 0.1,
    seed: int = 0,
    data_split: str | None = None,
    data_config: str | None = None,
    data_dir: str | None = None,
    data_revision: str | None = None,
    skip_invalid_rows: bool = False,
    hh_as_messages: bool | None = None,
    min_score_margin: float | None = None,
) -> Splits:
    """Read and check the rows of each split found in `data` (see the module docstring).

    Returns `Splits` for the requested splits that exist. When "valid" is requested but
    absent and `valid_fraction > 0`, it is carved from train by a permutation seeded with
    `seed` (the same rows every run). `hh_as_messages`: parse Anthropic HH transcripts into
    chat messages (None: when every row is one). Raises `DataError` listing the bad rows.
    """
    data = str(data)
    keywords = split_keywords(data_split, tuple(splits))
    records, problems = read_split_records(
        data, keywords, config=data_config, data_dir=data_dir, revision=data_revision
    )
    _check_splits_found(data, splits, keywords, records)
    n_unparsed = sum(p.reason != "unreadable file" for p in problems)
    fields = (prompt_field, chosen_field, rejected_field)
    wanted = {s: records[s] for s in splits if s in records}
    formats = Counter(detect(r, fields) for rs in wanted.values() for _, r in rs)
    if hh_as_messages is None:  # auto: only when the whole dataset is HH transcripts
        hh_as_messages = bool(formats) and set(formats) == {"hh"}
    out = Splits(formats=formats, hh_messages=hh_as_messages)
    for split, split_records in wanted.items():
        out[split] = _normalize_rows(split_records, fields, hh_as_messages, problems)
    problems += _filter_margin(out, min_score_margin)
    # every row: the records read, and the lines that could not be read as one
    n_records = sum(len(r) for r in wanted.values()) + n_unparsed
    _raise_on_invalid(problems, n_records, skip_invalid_rows, data)
    out.skipped = [p for p in problems if p.reason != "unreadable file"]
    if "valid" in splits and "valid" not in out and valid_fraction > 0 and "train" in out:
        train, valid = carve_valid(out["train"], valid_fraction, seed)
        if valid:
            out["train"], out["valid"] = train, valid
    return out


def _check_splits_found(data: str, splits, keywords: dict, records: dict) -> None:
    """DataError when the train split, or a split named with --data-split, has no files."""
    for split, words in keywords.items():
        named = words != SPLIT_KEYWORDS.get(split)  # given with --data-split: must exist
        if split in splits and split not in records and (split == "train" or named):
            raise DataError(
                f"{data}: no files for the {split} split; looked for {words[0]}.jsonl (or .json/"
                f".parquet), data/{words[0]}-*.parquet, a {words[0]}/ folder or a file name "
                f"containing '{words[0]}' (name it with --data-split)"
            )


def _normalize_rows(records, fields, hh_messages: bool, problems: list[Problem]) -> list:
    """The split's rows in the one internal form; the rows that fail go to `problems`."""
    rows = []
    for source, record in records:
        row, problem = normalize_row(record, source, fields, hh_messages=hh_messages)
        if problem:
            problems.append(problem)
        else:
            rows.append(row)
    return rows


def _filter_margin(out: Splits, min_score_margin: float | None) -> list[Problem]:
    if min_score_margin is None:
        return []
    rows = [r for rs in out.values() for r in rs]
    if rows and not any("margin" in r for r in rows):
        raise DataError(
            "--min-score-margin: the rows have no scores (score_chosen/score_rejected or "
            "chosen-rating/rejected-rating)"
        )
    skipped = []
    for split, split_rows in out.items():
        keep = []
        for row in split_rows:
            margin = row.get("margin")
            if margin is not None and margin >= min_score_margin:
                keep.append(row)
                continue
            why = (
                "no scores" if margin is None else f"score margin {margin:g} < {min_score_margin:g}"
            )
            skipped.append(Problem(row["source"], "score margin below minimum", why, False))
        out[split] = keep
    return skipped


def _raise_on_invalid(problems: list[Problem], n_records: int, skip: bool, data: str) -> None:
    fatal = [p for p in problems if p.reason == "unreadable file"]
    invalid = [p for p in problems if p.structural and p.reason != "unreadable file"]
    if fatal or (invalid and not skip):
        hint = "" if fatal or not invalid else "(or pass --skip-invalid-rows to skip invalid rows)"
        raise DataError(capped(fatal + invalid, data, hint))
    if invalid and 2 * len(invalid) > n_records:
        head = (
            f"{data}: {len(invalid)} of {n_records} rows are invalid ({skip_counts(invalid)}); "
            "with more than half invalid the field mapping or format is wrong, not the data"
        )
        raise DataError([head, *capped(invalid, data, shown=MAX_SHOWN - 1)])


def carve_valid(train: list, fraction: float, seed: int) -> tuple[list, list]:
    """Move `round(fraction * n)` rows (at least 1, leaving at least 1) from train to valid."""
    if len(train) < 2:
        return train, []
    n_valid = min(len(train) - 1, max(1, round(fraction * len(train))))
    picked = set(np.random.default_rng(seed).permutation(len(train))[:n_valid].tolist())
    # Both keep file order, so sources read in order.
    keep = [r for i, r in enumerate(train) if i not in picked]
    return keep, [r for i, r in enumerate(train) if i in picked]
