"""Checkpoints for an exact resume, written atomically.

A checkpoint is a directory `checkpoints/<step>/` holding the adapters, the optimizer state
(which includes its step, so the learning-rate schedule resumes too) and the step, which is also
the data cursor (batches are a pure function of seed and step) and the RNG position (the trainer
reseeds MLX's generator from seed and step before every update). It is written under a temporary name and renamed; `checkpoints/latest` then points at it
(os.replace), so a kill at any moment leaves the previous checkpoint usable. The run directory's
`adapters.safetensors` (what mlx-lm loads) is replaced the same way.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

KEEP = 2  # checkpoints kept on disk; older ones are deleted after a new one lands


@dataclass
class Checkpoint:
    step: int
    adapters: dict[str, mx.array]
    optimizer_state: dict
    meta: dict


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_save_safetensors(path: Path, arrays: dict[str, mx.array], metadata=None) -> None:
    tmp = path.with_name(path.name + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata=metadata or {})
    os.replace(tmp, path)


def save(run_dir: Path, step: int, adapters: dict, optimizer_state: dict, meta: dict) -> Path:
    """Write checkpoint `step` and point `latest` at it; returns its directory."""
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{step:07d}"
    tmp = root / f".{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    mx.save_safetensors(str(tmp / "adapters.safetensors"), adapters)
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer_state)))
    (tmp / "state.json").write_text(json.dumps({"step": step, **meta}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    atomic_save_safetensors(run_dir / "adapters.safetensors", adapters)
    for old in sorted(p for p in root.iterdir() if p.is_dir() and p.name.isdigit())[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(run_dir: Path) -> Checkpoint | None:
    """The checkpoint `latest` points at, or None when the run has none."""
    latest = run_dir / "checkpoints" / "latest"
    if not latest.exists():
        return None
    ckpt = run_dir / "checkpoints" / latest.read_text().strip()
    meta = json.loads((ckpt / "state.json").read_text())
    opt = mx.load(str(ckpt / "optimizer.safetensors"))
    return Checkpoint(
        step=meta["step"],
        adapters=mx.load(str(ckpt / "adapters.safetensors")),
        optimizer_state=tree_unflatten(list(opt.items())),
        meta=meta,
    )
