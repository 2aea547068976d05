"""Local data files: read records from .jsonl/.json/.parquet (optionally compressed), and find
the split files of a directory by Hugging Face naming conventions.

Each record comes with its source, the location every message about it names:
`file.jsonl:17` (line 17), `file.json: item 3` (3rd element of a JSON array, from 1) or
`file.parquet:row 16` (Parquet/Arrow row index, from 0, as `datasets` counts).
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path
from typing import Any

from mlx_dpo.formats import HELP, Problem

PLAIN_SUFFIXES = (".jsonl", ".json", ".parquet")
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zst": "zstd"}
DATA_SUFFIXES = PLAIN_SUFFIXES + tuple(
    s + c for s in (".jsonl", ".json") for c in COMPRESSIONS
)  # .jsonl.gz, .json.zst, ...
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test", "testing"),
}
_SHARD_SUFFIX = re.compile(r"[-_.]?\d+(-of-\d+)?$")  # train-00000-of-00002, train_3
_BOM = b"\xef\xbb\xbf"


class DataError(ValueError):
    """Unusable data. `str()` is one line per problem, each naming the file and line or row,
    what is wrong and what to do. The CLI prints it and exits with status 2."""

    def __init__(self, problems: str | list):
        lines = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        super().__init__("\n".join(lines))


def unreadable(name: str, message: str) -> Problem:
    """A problem with a whole file: never skipped, since the file gives no rows."""
    return Problem(name, "unreadable file", message)


def data_suffix(name: str) -> tuple[str, str | None]:
    """(data suffix, compression) of a file name: "x.jsonl.gz" -> (".jsonl", "gzip")."""
    suffixes = [s.lower() for s in Path(name).suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    return (suffixes[-1] if suffixes else ""), compression


def read_records(path: Path, name: str) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """Raw records of one file as `(source, record)`, and every problem in it.

    `name` is how the file is shown in sources and messages (the path the user gave).
    """
    suffix, compression = data_suffix(path.name)
    if suffix not in (*PLAIN_SUFFIXES, "") or (compression and suffix == ".parquet"):
        kinds = ".jsonl, .json, .parquet, or .jsonl/.json compressed as .gz, .bz2, .xz, .zst"
        return [], [
            unreadable(name, f"unsupported file type '{''.join(Path(name).suffixes)}'; use {kinds}")
        ]
    if suffix == ".parquet":
        records, problems = _read_parquet(path, name)
    else:
        raw, problem = _read_bytes(path, name, compression)
        if problem:
            return [], [problem]
        if not raw.strip():
            return [], [unreadable(name, f"the file is empty; {HELP}")]
        records, problems = _parse_json(raw, name, suffix)
    if not records and not problems:
        problems = [unreadable(name, f"the file has no rows; {HELP}")]
    return records, problems


def _read_bytes(path: Path, name: str, compression: str | None) -> tuple[bytes, Problem | None]:
    try:
        if compression is None:
            return path.read_bytes(), None
        if compression == "zstd":  # no zstd in this Python's stdlib; pyarrow has the codec
            import pyarrow as pa

            with pa.input_stream(str(path), compression="zstd") as f:
                return f.read(), None
        opener = {"gzip": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
        with opener(path, "rb") as f:
            return f.read(), None
    except Exception as e:  # each codec raises its own types (OSError, EOFError, ArrowException)
        return b"", unreadable(
            name, f"not a readable {compression or ''} file ({e})".replace("  ", " ")
        )


def _parse_json(raw: bytes, name: str, suffix: str) -> tuple[list, list[Problem]]:
    if suffix == ".json" and raw.lstrip(_BOM + b" \t\r\n")[:1] in (b"[", b"{"):
        try:
            text = raw.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
        except UnicodeDecodeError as e:
            return [], [_not_utf8(raw, e, name)]
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                message = f"malformed JSON ({e.msg} at column {e.colno})"
                return [], [unreadable(f"{name}:{e.lineno}", message)]
        else:
            if isinstance(doc, list):
                return [(f"{name}: item {i}", rec) for i, rec in enumerate(doc, start=1)], []
            return [(f"{name}:1", doc)], []
    return _parse_json_lines(raw, name)


def _parse_json_lines(raw: bytes, name: str) -> tuple[list, list[Problem]]:
    # JSON Lines, also in a `.json` file that is not one document (as `datasets` accepts).
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028 etc.
    records, problems = [], []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue
        source = f"{name}:{lineno}"
        try:
            records.append((source, json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            problems.append(_not_utf8(line, e, source))
        except json.JSONDecodeError as e:
            message = (
                f"malformed JSON ({e.msg} at column {e.colno}); "
                "each line must be one complete JSON object"
            )
            problems.append(Problem(source, "malformed JSON", message))
    return records, problems


def _not_utf8(raw: bytes, e: UnicodeDecodeError, where: str) -> Problem:
    line = raw[: e.start].count(b"\n")
    column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
    if line:  # a whole document: say which line of it
        where = f"{where}:{line + 1}"
    message = (
        f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); re-save the file as UTF-8"
    )
    return Problem(where, "not UTF-8", message)


def _read_parquet(path: Path, name: str) -> tuple[list, list[Problem]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        return [], [unreadable(name, f"not a readable Parquet file ({e})")]
    return [(f"{name}:row {i}", rec) for i, rec in enumerate(rows)], []


# ---------------------------------------------------------------------------------------------
# Directories -> split files


def split_keywords(data_split: str | None, wanted: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Name keywords for each split. `data_split` is "NAME" (the train split's name, as
    "train_prefs") or "train=NAME,valid=NAME,test=NAME"."""
    named = {}
    for item in filter(None, (data_split or "").split(",")):
        ours, _, theirs = item.rpartition("=")
        ours = ours.strip() or "train"
        if ours not in SPLIT_KEYWORDS:
            raise DataError(
                f"--data-split {data_split!r}: unknown split '{ours}'; use NAME or "
                "train=NAME,valid=NAME,test=NAME"
            )
        named[ours] = (theirs.strip(),)
    # Named splits first: the files they claim are not matched again by default keywords.
    return named | {s: SPLIT_KEYWORDS.get(s, (s,)) for s in wanted if s not in named}


def split_tier(rel: Path, keyword: str) -> int | None:
    """How well a file matches a split keyword: 0 named after it (train.jsonl,
    train-00000-of-00001.parquet), 1 inside a folder named after it, 2 keyword in the name."""
    stem = rel.name.split(".")[0].lower()
    if _SHARD_SUFFIX.sub("", stem) == keyword.lower():
        return 0
    if keyword.lower() in (p.lower() for p in rel.parts[:-1]):
        return 1
    if re.search(rf"(^|[-._ \d]){re.escape(keyword.lower())}($|[-._ \d])", stem):
        return 2
    return None


def _group(rel: Path, keyword: str, tier: int) -> tuple:
    # Files of one split: shards of one name in one folder, or everything under the split folder.
    if tier == 1:
        parts = [p.lower() for p in rel.parts]
        return tuple(parts[: parts.index(keyword.lower()) + 1])
    return (rel.parent, _SHARD_SUFFIX.sub("", rel.name.split(".")[0].lower()))


def match_splits(
    names: list[Path], keywords: dict[str, tuple[str, ...]], what: str, kind: str = "file sets"
) -> dict[str, list[Path]]:
    """The names (files, or a Hub dataset's split names) of each split, best tier first."""
    found: dict[str, list[Path]] = {}
    for split, words in keywords.items():
        claimed = {f for fs in found.values() for f in fs}
        for tier in range(3):
            hits = {
                (f, w)
                for f in names
                for w in words
                if f not in claimed and split_tier(f, w) == tier
            }
            if hits:
                groups = {_group(f, w, tier) for f, w in hits}
                if len(groups) > 1:
                    listed = ", ".join(sorted(str(f) for f, _ in hits)[:6])
                    raise DataError(
                        f"{what}: several {kind} match split "
                        f"'{split}' ({listed}); pick one with --data-split NAME or --data-config CONFIG"
                    )
                found[split] = sorted({f for f, _ in hits})
                break
    return found


def find_split_files(
    root: Path, keywords: dict[str, tuple[str, ...]], config: str | None, name: str
) -> dict[str, list[Path]]:
    """The data files of each split under `root` (relative paths), by Hugging Face naming
    conventions: `train.jsonl`, `data/train-00000-of-00001.parquet`, `train/…`, `x_train.json`."""
    files = sorted(
        f.relative_to(root)
        for f in root.rglob("*")
        if f.is_file()
        and f.name.lower().endswith(DATA_SUFFIXES)
        and not any(p.startswith(".") for p in f.relative_to(root).parts)
    )
    if config:
        configs = sorted({f.parts[0] for f in files if len(f.parts) > 1})
        files = [f for f in files if config in f.parts[:-1]]
        if not files:
            raise DataError(
                f"{name}: no data files for config '{config}'; configs found: "
                f"{', '.join(configs) or 'none'}"
            )
    found = match_splits(files, keywords, name)
    if not found and files and "train" in keywords:
        found["train"] = files  # no split names at all: everything is train
    return found
