"""Checkpoints for an exact resume, written so that no kill, full disk or NaN loses a good one.

A checkpoint is a directory `checkpoints/<step>/` holding the adapters, the optimizer state
(which includes its step, so the learning-rate schedule resumes too) and `state.json` with the
step, which is also the data cursor (batches are a pure function of seed and step) and the RNG
position (the trainer reseeds MLX's generator from seed and step before every update).

Writing: every file goes into `checkpoints/.<step>.tmp/`, is fsync'ed, and the directory is
renamed into place; then `checkpoints/latest` and the run's `adapters.safetensors` (what mlx-lm
loads) are replaced by rename. A kill at any moment leaves the previous checkpoint usable; a
failed write removes its temporary directory. Non-finite parameters are never written.

Reading: `load` takes the newest intact checkpoint and says what it skipped; `--resume` sets the
broken ones aside and republishes the adapters it resumes from (healing a cut final write).
"""

from __future__ import annotations

import io
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_dpo import _testhooks
from mlx_dpo.errors import RunError
from mlx_dpo.rundir import ADAPTERS, CHECKPOINTS, atomic_write_text, fsync_dir, write_error

KEEP = 2  # checkpoints kept on disk; older ones are deleted after a new one lands


class NonFiniteParameters(RuntimeError):
    """The parameters about to be saved hold NaN or inf; nothing was written."""


@dataclass
class Checkpoint:
    step: int
    adapters: dict[str, mx.array]
    optimizer_state: dict
    meta: dict
    skipped: list[str] = field(default_factory=list)  # what was not intact, and why
    broken: list[str] = field(default_factory=list)  # names of newer checkpoints not intact


def all_finite(arrays: dict[str, mx.array]) -> bool:
    flags = [mx.all(mx.isfinite(v)) for v in arrays.values() if mx.issubdtype(v.dtype, mx.floating)]
    return bool(mx.all(mx.stack(flags)).item()) if flags else True


def write_safetensors(path: Path, arrays: dict[str, mx.array]) -> None:
    """Serialize in memory, then write and fsync from Python: MLX's own file writer reports a
    full disk as a RuntimeError without the path, Python's as an OSError naming it."""
    buffer = io.BytesIO()
    mx.save_safetensors(buffer, arrays)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def save_safetensors(path: Path, arrays: dict[str, mx.array], hook: str, step: int) -> None:
    """Write, fsync and rename into place; a failure leaves `path` as it was."""
    tmp = path.with_name(path.name + ".tmp.safetensors")
    try:
        write_safetensors(tmp, arrays)
        _testhooks.point(hook, step)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    fsync_dir(path.parent)


def save(run_dir: Path, step: int, adapters: dict, optimizer_state: dict, meta: dict) -> Path:
    """Write checkpoint `step`, point `latest` at it and publish its adapters."""
    optimizer_arrays = dict(tree_flatten(optimizer_state))
    if not all_finite(adapters) or not all_finite(optimizer_arrays):
        raise NonFiniteParameters(f"step {step}")
    root = run_dir / CHECKPOINTS
    final, tmp = root / f"{step:07d}", root / f".{step:07d}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_safetensors(tmp / "adapters.safetensors", adapters)
        _testhooks.point("checkpoint-write", step)
        write_safetensors(tmp / "optimizer.safetensors", optimizer_arrays)
        (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
        _fsync_file(tmp / "state.json")
        fsync_dir(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(Path(e.filename) if e.filename else tmp, e) from None
    save_safetensors(run_dir / ADAPTERS, adapters, "adapters-write", step)
    for old in _numbered(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(run_dir: Path) -> Checkpoint | None:
    """The newest intact checkpoint; None if there are none at all. Raises RunError when
    checkpoints exist but none is intact. Every checkpoint is complete before it is renamed
    into place, so the newest intact one is the latest work even when `latest` lags behind."""
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return None
    candidates = sorted(_numbered(root), reverse=True)
    named, skipped, broken = _latest_name(root), [], []
    if (root / "latest").exists() and (named is None or not (root / named).is_dir()):
        skipped.append(f"{CHECKPOINTS}/latest (names no checkpoint: {named or 'unreadable'})")
    for ckpt in candidates:
        try:
            found = _read(ckpt)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            skipped.append(f"{ckpt.relative_to(run_dir)} ({_short(e)})")
            broken.append(ckpt.name)
            continue
        found.skipped, found.broken = skipped, broken
        return found
    if not candidates:
        return None
    raise RunError(
        f"{run_dir}: no intact checkpoint to resume from (skipped {'; '.join(skipped)}); "
        "start a new run with another --adapter-path"
    )


def set_aside(run_dir: Path, names: list[str]) -> None:
    """Move broken checkpoints out of the numbered sequence (kept as `.broken-<step>`)."""
    root = run_dir / CHECKPOINTS
    for name in names:
        if (root / name).is_dir():
            os.replace(root / name, root / f".broken-{name}")


def set_latest(run_dir: Path, step: int) -> None:
    atomic_write_text(run_dir / CHECKPOINTS / "latest", f"{step:07d}\n")


def _read(ckpt: Path) -> Checkpoint:
    meta = json.loads((ckpt / "state.json").read_text())
    if not isinstance(meta, dict) or int(meta["step"]) != int(ckpt.name):
        raise ValueError("state.json does not name this step")
    adapters = mx.load(str(ckpt / "adapters.safetensors"))
    opt = mx.load(str(ckpt / "optimizer.safetensors"))
    if not all_finite(adapters) or not all_finite(opt):
        raise ValueError("non-finite values")
    return Checkpoint(
        step=int(meta["step"]),
        adapters=adapters,
        optimizer_state=tree_unflatten(list(opt.items())),
        meta=meta,
    )


def _latest_name(root: Path) -> str | None:
    try:
        name = (root / "latest").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if name.isdigit() else None


def _numbered(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _short(e: Exception) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:120]
