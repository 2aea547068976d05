"""Reading preference rows: local files and directories, and Hugging Face datasets.

`load_splits` turns `--data` into normalized rows, one dict per pair:
`{"prompt": str | list[msg], "chosen": ..., "rejected": ..., "source": "file:line"}`.
Every row is checked and every problem is collected before one `DataError` is raised, so a
user fixes a whole file in one go. Tokenization lives in `mlx_dpo.data`.

Where rows come from (`data`):
- a file: `.jsonl` (one JSON object a line), `.json` (an array of objects, or JSON Lines),
  `.parquet`. It is the train split.
- a directory: split files found by Hugging Face conventions (`find_split_files`).
- a Hugging Face dataset id `org/name`: a snapshot in the local HF cache, downloaded first
  unless `HF_HUB_OFFLINE=1`, then read like a directory.

Row formats (TRL naming): standard (three strings), conversational (lists of
`{"role", "content"}` messages), implicit prompt (no prompt: it is the longest common
prefix of chosen and rejected). Extra fields are ignored.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

MAX_SHOWN = 10  # problems listed per file before "... and N more"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
SPLIT_KEYWORDS = {
    "train": ("train", "training"),
    "valid": ("valid", "validation", "val", "dev"),
    "test": ("test", "testing"),
}
FORMATS = (
    "rows need prompt/chosen/rejected as strings or as lists of {role, content} messages "
    "(see 'Data formats' in the README)"
)
FIELD_FLAGS = ("prompt-field", "chosen-field", "rejected-field")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHARD_SUFFIX = re.compile(r"[-_.]?\d+(-of-\d+)?$")  # train-00000-of-00002, train_3


class DataError(ValueError):
    """Unusable data. `str()` is one line per problem, each naming the file and line or row,
    what is wrong and what to do. The CLI prints it and exits with status 2."""

    def __init__(self, problems: str | list[str]):
        lines = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(lines))


def capped(problems: list[str], where: str) -> list[str]:
    """The first MAX_SHOWN problems, then one line counting the rest."""
    if len(problems) <= MAX_SHOWN:
        return problems
    return problems[:MAX_SHOWN] + [f"... and {len(problems) - MAX_SHOWN} more problems in {where}"]


# ---------------------------------------------------------------------------------------------
# Files -> raw records


def read_records(path: Path, name: str) -> tuple[list[tuple[str, Any]], list[str]]:
    """Raw records of one file as `(source, record)`, and the file's problems (capped).

    `name` is how the file is shown in sources and messages (the path the user gave).
    """
    suffix = path.suffix.lower()
    if suffix not in (*DATA_SUFFIXES, ""):
        return [], [f"{name}: unsupported file type '{suffix}'; use .jsonl, .json or .parquet"]
    if suffix == ".parquet":
        records, problems = _read_parquet(path, name)
    else:
        text, problem = _read_text(path, name)
        if problem:
            return [], [problem]
        records, problems = _parse_json_text(text, name, suffix)
    if not records and not problems:
        problems = [f"{name}: the file has no rows; {FORMATS}"]
    return records, capped(problems, name)


def _read_text(path: Path, name: str) -> tuple[str, str | None]:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), None  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        return "", (
            f"{name}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {column}); "
            "re-save the file as UTF-8"
        )


def _parse_json_text(text: str, name: str, suffix: str) -> tuple[list, list[str]]:
    if not text.strip():
        return [], [f"{name}: the file is empty; {FORMATS}"]
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                return [], [f"{name}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})"]
        else:
            rows = doc if isinstance(doc, list) else [doc]
            return [(f"{name}:row {i}", rec) for i, rec in enumerate(rows)], []
    # JSON Lines, also in a `.json` file that is not one document (as `datasets` accepts).
    # Split on "\n" only: str.splitlines() would also split inside strings at U+2028 etc.
    records, problems = [], []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{name}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append(
                f"{name}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                "each line must be one complete JSON object"
            )
    return records, problems


def _read_parquet(path: Path, name: str) -> tuple[list, list[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        return [], [f"{name}: not a readable Parquet file ({e})"]
    return [(f"{name}:row {i}", rec) for i, rec in enumerate(rows)], []


# ---------------------------------------------------------------------------------------------
# Records -> normalized rows


def normalize_row(
    record: Any, source: str, fields: tuple[str, str, str]
) -> tuple[dict | None, str | None]:
    """One checked row `{"prompt", "chosen", "rejected", "source"}`, or one problem line."""
    prompt_field, chosen_field, rejected_field = fields
    if not isinstance(record, dict):
        kind = type(record).__name__
        return None, f"{source}: expected an object with {'/'.join(fields)}, got a JSON {kind}"
    wanted = [chosen_field, rejected_field]
    if record.get(prompt_field) is not None:  # absent or null: an implicit prompt
        wanted.insert(0, prompt_field)
    missing = [f for f in wanted if record.get(f) is None]
    problems = [p for p in (_check_value(record[f], f) for f in wanted if f not in missing) if p]
    if missing:
        flags = "/".join(f"--{FIELD_FLAGS[fields.index(f)]}" for f in missing)
        keys = ", ".join(map(str, record)) or "none"
        names = ", ".join(f"'{f}'" for f in missing)
        problems.insert(
            0,
            f"missing field{'s' * (len(missing) > 1)} {names} (fields present: {keys}; map yours with {flags})",
        )
    if problems:
        return None, f"{source}: " + "; ".join(problems)
    prompt = _messages(record.get(prompt_field))
    chosen, rejected = _messages(record[chosen_field]), _messages(record[rejected_field])
    if isinstance(chosen, str) != isinstance(rejected, str):
        return None, (
            f"{source}: '{chosen_field}' and '{rejected_field}' must both be strings or both be "
            "lists of messages"
        )
    if isinstance(prompt, list) and isinstance(chosen, str):
        # A chat prompt with plain-text answers: the answers are the assistant's turn.
        chosen, rejected = _as_turn(chosen), _as_turn(rejected)
    if isinstance(prompt, str) and isinstance(chosen, list):
        # A text prompt beside conversations. UltraFeedback-style rows repeat it inside them
        # (TRL's maybe_extract_prompt then infers the prompt); otherwise it is the user's turn.
        shared = common_prefix_length(chosen, rejected) > 0
        prompt = None if shared else [{"role": "user", "content": prompt}]
    if prompt is None:
        split = split_implicit_prompt(chosen, rejected)
        if isinstance(split, str):
            return None, f"{source}: {split}"
        prompt, chosen, rejected = split
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}, None


def _check_value(value: Any, field: str) -> str | None:
    if isinstance(value, str):
        return f"field '{field}' is empty" if not value.strip() else None
    if not isinstance(value, list):
        return (
            f"field '{field}' must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not value:
        return f"field '{field}' is an empty list of messages"
    for i, message in enumerate(value):
        problem = _check_message(message)
        if problem:
            return f"field '{field}' message {i}: {problem}"
    return None


def _check_message(message: Any) -> str | None:
    if not isinstance(message, dict):
        return f"expected a {{role, content}} object, got {type(message).__name__}"
    if "from" in message and "value" in message and "role" not in message:
        return "has ShareGPT keys from/value; rename them to role/content (human->user, gpt->assistant)"
    for key in ("role", "content"):
        if message.get(key) is None:
            return f"has no '{key}'"
        if not isinstance(message[key], str):
            return f"'{key}' must be a string, got {type(message[key]).__name__}"
    return None


def _messages(value: Any) -> Any:
    # Parquet structs come back with every key, absent ones as None: drop those.
    if isinstance(value, list):
        return [{k: v for k, v in m.items() if v is not None} for m in value]
    return value


def _as_turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def common_prefix_length(a: list | str, b: list | str) -> int:
    """Number of leading items (tokens, messages or characters) `a` and `b` share."""
    n, limit = 0, min(len(a), len(b))
    while n < limit and a[n] == b[n]:
        n += 1
    return n


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from two strings or two conversations, or a problem string.

    The prompt is the longest common prefix (of messages, or of characters); as in TRL's
    extract_prompt, a space right before the split stays with the completions.
    """
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and 0 < n < len(chosen) and chosen[n - 1] == " ":
        n -= 1
    what = "text" if isinstance(chosen, str) else "messages"
    if n == 0:
        return (
            f"no prompt field and chosen/rejected share no leading {what}, so the prompt cannot "
            "be inferred; add a 'prompt' field"
        )
    if n == len(chosen) or n == len(rejected):
        return "no prompt field and one of chosen/rejected is a prefix of the other: empty answer"
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------------------------------------
# Directories and the Hub -> split files


def split_keywords(data_split: str | None, wanted: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """File-name keywords for each split. `data_split` is "NAME" (the train split's name, as
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


def _split_tier(rel: Path, keyword: str) -> int | None:
    """How well a file matches a split keyword: 0 named after it (train.jsonl,
    train-00000-of-00001.parquet), 1 inside a folder named after it, 2 keyword in the name."""
    stem = rel.name.split(".")[0].lower()
    if _SHARD_SUFFIX.sub("", stem) == keyword:
        return 0
    if keyword in (p.lower() for p in rel.parts[:-1]):
        return 1
    if re.search(rf"(^|[-._ \d]){re.escape(keyword)}($|[-._ \d])", stem):
        return 2
    return None


def _group(rel: Path, keyword: str, tier: int) -> tuple:
    # Files of one split: shards of one name in one folder, or everything under the split folder.
    if tier == 1:
        parts = [p.lower() for p in rel.parts]
        return tuple(parts[: parts.index(keyword) + 1])
    return (rel.parent, _SHARD_SUFFIX.sub("", rel.name.split(".")[0].lower()))


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
    found: dict[str, list[Path]] = {}
    for split, words in keywords.items():
        claimed = {f for fs in found.values() for f in fs}
        for tier in range(3):
            hits = {
                (f, w)
                for f in files
                for w in words
                if f not in claimed and _split_tier(f, w) == tier
            }
            if hits:
                groups = {_group(f, w, tier) for f, w in hits}
                if len(groups) > 1:
                    listed = ", ".join(sorted(str(f) for f, _ in hits)[:6])
                    raise DataError(
                        f"{name}: several file sets match split '{split}' ({listed}); pick one "
                        "with --data-split NAME or --data-config CONFIG"
                    )
                found[split] = sorted({f for f, _ in hits})
                break
    if not found and files and "train" in keywords:
        found["train"] = files  # no split names at all: everything is train
    return found


def _hf_cache_dir() -> str | None:
    # Read at call time: huggingface_hub reads its environment only once, at import.
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return None


def download_dataset(repo_id: str, revision: str | None) -> Path:
    """The local snapshot of a Hub dataset (data files only), downloaded unless offline."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    offline = offline or bool(constants.HF_HUB_OFFLINE)
    at = f" at revision {revision}" if revision else ""
    try:
        path = snapshot_download(
            repo_id,
            repo_type="dataset",
            revision=revision,
            cache_dir=_hf_cache_dir(),
            local_files_only=offline,
            allow_patterns=[f"*{s}" for s in DATA_SUFFIXES],
        )
    except LocalEntryNotFoundError:
        why = "downloads are off (HF_HUB_OFFLINE=1)" if offline else "the Hub could not be reached"
        raise DataError(
            f"{repo_id}: no such local path, and dataset{at} is not in the local Hugging Face "
            f"cache and {why}; fetch it once with network access "
            f"(`hf download {repo_id} --repo-type dataset`) or pass a local path"
        ) from None
    except HfHubHTTPError as e:
        raise DataError(
            f"{repo_id}: no such local path, and the Hugging Face Hub did not give dataset{at} "
            f"({str(e).splitlines()[0]}); check the id, or log in (`hf auth login`) if it is gated"
        ) from None
    return Path(path)


# ---------------------------------------------------------------------------------------------
# load_splits


def resolve_data(
    data: str, keywords: dict[str, tuple[str, ...]], config: str | None, revision: str | None
) -> tuple[dict[str, list[tuple[Path, str]]], str | None]:
    """`(path, display name)` of each split's files, and the Hub id when `data` is one."""
    path = Path(data).expanduser()
    if path.is_file():
        return {"train": [(path, data)]}, None
    if path.is_dir():
        found = find_split_files(path, keywords, config, data)
        return {s: [(path / f, str(Path(data) / f)) for f in fs] for s, fs in found.items()}, None
    if _HUB_ID.match(data) and not data.lower().endswith(DATA_SUFFIXES):
        root = download_dataset(data, revision)
        found = find_split_files(root, keywords, config, data)
        return {s: [(root / f, f"{data}/{f}") for f in fs] for s, fs in found.items()}, data
    raise DataError(
        f"{data}: no such file or directory; --data takes a directory with train.jsonl/"
        "valid.jsonl, a .jsonl/.json/.parquet file, or a Hugging Face dataset id (org/name)"
    )


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
    data_revision: str | None = None,
) -> dict[str, list[dict]]:
    """Read and check the rows of each split found in `data`.

    Returns `{split: rows}` for the requested splits that exist. When "valid" is requested
    but absent and `valid_fraction > 0`, it is carved from train by a permutation seeded
    with `seed` (the same rows every run). Raises `DataError` listing every bad row.
    """
    data = str(data)
    keywords = split_keywords(data_split, tuple(splits))
    files, hub_id = resolve_data(data, keywords, data_config, data_revision)
    for split, words in keywords.items():
        named = words != SPLIT_KEYWORDS.get(split)  # given with --data-split: must exist
        if split in splits and split not in files and (split == "train" or named):
            raise DataError(
                f"{data}: no files for the {split} split; looked for {words[0]}.jsonl (or .json/"
                f".parquet), data/{words[0]}-*.parquet, a {words[0]}/ folder or a file name "
                f"containing '{words[0]}' (name it with --data-split)"
            )
    fields = (prompt_field, chosen_field, rejected_field)
    rows, problems = {}, []
    for split in (s for s in splits if s in files):
        rows[split], split_problems = _read_split(
            files[split], fields, hub_id and f"{hub_id}[{split}]"
        )
        problems += split_problems
    if problems:
        raise DataError(problems)
    if "valid" in splits and "valid" not in rows and valid_fraction > 0 and "train" in rows:
        train, valid = carve_valid(rows["train"], valid_fraction, seed)
        if valid:
            rows["train"], rows["valid"] = train, valid
    return rows


def _read_split(
    files: list[tuple[Path, str]], fields: tuple[str, str, str], hub_split: str | None
) -> tuple[list[dict], list[str]]:
    rows, problems, n_records = [], [], 0
    for path, name in files:
        records, file_problems = read_records(path, name)
        if hub_split:  # rows of a Hub split are counted across its shards, like `datasets`
            records = [(f"{hub_split}:row {n_records + i}", r) for i, (_, r) in enumerate(records)]
        n_records += len(records)
        bad = []
        for source, record in records:
            row, problem = normalize_row(record, source, fields)
            if problem:
                bad.append(problem)
            else:
                rows.append(row)
        problems += file_problems + capped(bad, name)
    return rows, problems


def carve_valid(train: list, fraction: float, seed: int) -> tuple[list, list]:
    """Move `round(fraction * n)` rows (at least 1, leaving at least 1) from train to valid."""
    if len(train) < 2:
        return train, []
    n_valid = min(len(train) - 1, max(1, round(fraction * len(train))))
    picked = set(np.random.default_rng(seed).permutation(len(train))[:n_valid].tolist())
    # Both keep file order, so sources read in order.
    keep = [r for i, r in enumerate(train) if i not in picked]
    return keep, [r for i, r in enumerate(train) if i in picked]
