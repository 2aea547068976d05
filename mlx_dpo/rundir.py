"""A run directory (`--adapter-path`): who owns it, what it holds, and what a resume may change.

One process owns a run directory while it trains: `RunDir.acquire` takes an OS file lock
(`fcntl.flock` on `.lock`), which the kernel drops when the process dies, so kill -9 leaves
nothing stale. A directory "holds a run" when it has anything a new run would overwrite: our
checkpoints or adapters, or files that are not ours (a PEFT adapter, someone's notes). A new run
goes only into an empty directory (or one whose earlier run saved nothing); a resume only into
one of ours, and only with the settings that give its saved arrays their meaning.

`run.json` records the run's identity once (the settings plus the content hash of its
tokenized pairs) and every change a `--resume --allow-changes` made, with its step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from mlx_dpo.errors import RunError

LOCK = ".lock"
PROBE = ".write-test-"
IDENTITY = "run.json"
ADAPTERS = "adapters.safetensors"
CONFIG = "adapter_config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
# Files an earlier run of ours writes before its first checkpoint; nothing is lost by replacing them.
PROVISIONAL = {LOCK, IDENTITY, CONFIG, METRICS, "metrics.png", "skipped_rows.jsonl"}

# Settings that give the saved arrays their meaning: a resume may never change them.
SHAPE_SETTINGS = (
    "model",
    "revision",
    "quantize",
    "q_group_size",
    "fine_tune_type",
    "num_layers",
    "lora_rank",
    "lora_scale",
    "lora_keys",
    "init_adapter",
    "optimizer",
)
# Settings that only say how long to run, where and how to report: a resume may change them.
FREE_SETTINGS = (
    "adapter_path",
    "resume",
    "allow_changes",
    "iters",
    "epochs",
    "steps_per_report",
    "steps_per_eval",
    "val_batches",
    "save_every",
    "reference_cache",
    "report_to",
    "demo_summary",
    "share_prompt",  # the same log-probs either way (to round-off), only the batch layout
)


@dataclass
class RunDir:
    path: Path
    created: bool = False  # this process made the directory (removed again if nothing is saved)
    _lock_fd: int | None = field(default=None, repr=False)

    # --- what the directory holds
    def entries(self) -> list[str]:
        """The directory's files, but our own lock and write probes (another rank's, say)."""
        if not self.path.is_dir():
            return []
        names = (p.name for p in self.path.iterdir())
        return sorted(n for n in names if n != LOCK and not n.startswith(PROBE))

    def is_ours(self) -> bool:
        """An mlx_dpo run: it has our identity file or checkpoints."""
        return (self.path / IDENTITY).is_file() or (self.path / CHECKPOINTS).is_dir()

    def has_saved_work(self) -> bool:
        """Anything a new run would lose: checkpoints, adapters, or files that are not ours."""
        names = set(self.entries())
        if not self.is_ours():
            return bool(names)
        return bool(names - PROVISIONAL - {CHECKPOINTS}) or self.has_checkpoints()

    def has_checkpoints(self) -> bool:
        root = self.path / CHECKPOINTS
        return root.is_dir() and any(p.name.isdigit() for p in root.iterdir())

    # --- ownership
    def acquire(self) -> None:
        """Create the directory if needed, check it is writable and lock it for this process."""
        import fcntl

        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(_os_message(self.path, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(
                f"--adapter-path {self.path} is in use by another mlx_dpo process (PID {holder}); "
                "wait for it to finish or choose another --adapter-path"
            ) from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.check_writable()

    def is_locked(self) -> bool:
        """Another process trains in this directory now."""
        import fcntl

        try:
            fd = os.open(self.path / LOCK, os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except OSError:
            return True
        finally:
            os.close(fd)

    def check_writable(self) -> None:
        probe = self.path / f"{PROBE}{os.getpid()}"
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise RunError(_os_message(self.path, e)) from None
        finally:
            with suppress(OSError):
                probe.unlink()

    def release(self, *, saved: bool) -> None:
        """Drop the lock; a directory this process created and saved nothing in is removed."""
        if self._lock_fd is None:
            return
        if self.created and not saved and not self.has_checkpoints():
            shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock_fd)
        self._lock_fd = None

    def clear_provisional(self) -> None:
        """Remove what an earlier run wrote before it saved anything (a fresh start here)."""
        for name in PROVISIONAL - {LOCK}:
            with suppress(FileNotFoundError):
                (self.path / name).unlink()
        self.remove_temporaries()

    # --- as an adapter directory (what eval, compare, fuse and mlx-lm read)
    def adapter_config(self) -> dict:
        """adapter_config.json as a dict; ModelError when the directory is not an adapter
        directory or the file is unreadable."""
        from mlx_dpo.errors import ModelError

        if not self.path.is_dir():
            raise ModelError(f"--adapter-path {self.path}: no such directory")
        file = self.path / CONFIG
        if not file.is_file():
            raise ModelError(
                f"{self.path}: not an adapter directory (needs {CONFIG} and {ADAPTERS})"
            )
        try:
            config = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise ModelError(f"{file}: unreadable ({e})") from None
        if not isinstance(config, dict):
            raise ModelError(f"{file}: expected a JSON object")
        return config

    def adapters_file(self) -> Path:
        """The adapters' safetensors file; ModelError when it is missing."""
        from mlx_dpo.errors import ModelError

        file = self.path / ADAPTERS
        if not file.is_file():
            raise ModelError(f"{self.path}: not an adapter directory (no {ADAPTERS})")
        return file

    # --- identity and resume
    def read_identity(self) -> dict:
        """The run's recorded identity; runs from before run.json: their adapter_config.json."""
        for name in (IDENTITY, CONFIG):
            file = self.path / name
            if file.is_file():
                try:
                    saved = json.loads(file.read_text())
                except (OSError, ValueError) as e:
                    raise RunError(f"{file}: unreadable ({e}); the run cannot be resumed") from None
                if name == IDENTITY:
                    return saved
                # a run from before run.json: adapter_config.json holds its settings, except
                # num_layers, which mlx-lm's format stores resolved (-1 became the block count)
                saved.pop("num_layers", None)
                return {"settings": saved, "changes": []}
        raise RunError(f"{self.path}: no {IDENTITY} or {CONFIG}; the run cannot be resumed")

    def write_identity(self, identity: dict) -> None:
        atomic_write_text(self.path / IDENTITY, json.dumps(identity, indent=1) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Keep metrics.jsonl rows up to `step` (a resume replays the steps after it)."""
        file = self.path / METRICS
        if not file.is_file():
            return
        kept = []
        for line in file.read_text().splitlines():
            try:
                row = json.loads(line)
                if int(row["step"]) <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                continue  # a row cut short by a kill
        atomic_write_text(file, "".join(f"{line}\n" for line in kept))

    def append_metrics(self, row: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")

    def remove_temporaries(self) -> list[str]:
        """Leftovers of writes a kill interrupted: `*.tmp*` files and `.<step>.tmp` directories."""
        removed = []
        for p in [*self.path.glob("*.tmp*"), *(self.path / CHECKPOINTS).glob(".*.tmp*")]:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed.append(str(p.relative_to(self.path)))
        return removed


def compare_settings(saved: dict, given: dict) -> tuple[list[tuple], list[tuple]]:
    """(name, saved, given) of every difference: (those no resume may make, those
    `--allow-changes` accepts)."""
    hard, soft = [], []
    for name in sorted(set(saved) | set(given)):
        if name in FREE_SETTINGS or saved.get(name) == given.get(name):
            continue
        (hard if name in SHAPE_SETTINGS else soft).append((name, saved.get(name), given.get(name)))
    return hard, soft


def describe(differences: list[tuple]) -> str:
    return "; ".join(f"{name}: saved {old!r}, given {new!r}" for name, old, new in differences)


def fsync_dir(path: Path) -> None:
    with suppress(OSError):  # not every file system lets a directory be opened for fsync
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, fsync, rename over `path`: readers see old or new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError:
        with suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def _os_message(path: Path, e: OSError) -> str:
    reason = {
        errno.ENOSPC: "the disk is full",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EDQUOT: "disk quota exceeded",
    }.get(e.errno, e.strerror or str(e))
    return (
        f"--adapter-path {path}: cannot write there ({reason}); "
        "free space or choose another --adapter-path"
    )


def write_error(path: Path, e: OSError) -> RunError:
    """The one-line error for a write that failed mid-run (the previous checkpoint is intact)."""
    return RunError(
        f"could not write {path}: {e.strerror or e}; the previous checkpoint is intact "
        "(free space and continue with --resume)"
    )
