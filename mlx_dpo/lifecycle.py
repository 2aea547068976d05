"""Starting and resuming a run in its directory, so that no run mixes with or spoils another.

`open_run` decides, before anything loads, whether the directory may be used as asked: a new run
only where nothing would be lost; `--resume` only of an mlx_dpo run with an intact checkpoint and
the same shape settings. `check_changes` compares what needs the tokenized data (its content
hash) and the other settings; a difference is refused unless `--allow-changes`. Only then does
`start_writing` touch the directory: a new run clears what an earlier one left before its first
checkpoint; a resume heals what a kill left (temporary files, a stale adapters file, broken
checkpoints), cuts metrics.jsonl back to the checkpoint and records the accepted changes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from mlx_dpo import checkpoint, reference
from mlx_dpo.errors import RunError
from mlx_dpo.rundir import (
    ADAPTERS,
    CONFIG,
    RunDir,
    atomic_write_text,
    compare_settings,
    describe,
)

PATH_SETTINGS = ("model", "data", "ref_model", "init_adapter")


@dataclass
class Resume:
    ckpt: checkpoint.Checkpoint
    saved: dict  # the run's identity: settings, data_hash, changes
    finished: bool = False
    changes: list[tuple] = field(default_factory=list)  # accepted with --allow-changes
    writer: bool = True  # this process may write into the run directory (rank 0)


def settings(cfg) -> dict:
    """The config as saved in run.json: local paths made absolute, so a resume from another
    directory compares the same files."""
    return _normalized(cfg.to_dict())


def identity(cfg, train_pairs, valid_pairs) -> dict:
    return {
        "settings": settings(cfg),
        "data_hash": reference.pairs_digest([*train_pairs, *valid_pairs]),
        "changes": [],
    }


def open_run(cfg, run: RunDir, say, *, writer: bool = True) -> Resume | None:
    """Check the directory for a new run (None) or a resume (its checkpoint); changes nothing
    but, for a resume of a finished run, healing its published adapters (by the `writer` only:
    distributed, every rank takes the same decisions and rank 0 writes)."""
    if not cfg.resume:
        _check_empty(run)
        return None
    if not run.is_ours():
        what = "holds files that are not an mlx_dpo run" if run.entries() else "has no run"
        raise RunError(f"--resume: {run.path} {what}; start a new run without --resume")
    saved = run.read_identity()
    hard, _ = compare_settings(_normalized(saved.get("settings", {})), settings(cfg))
    if hard:
        raise RunError(
            f"--resume: {run.path} was trained with other settings, which its saved weights "
            f"depend on ({describe(hard)}); nothing was changed. Resume without them, or start "
            "a new run in another --adapter-path"
        )
    ckpt = checkpoint.load(run.path)
    if ckpt is None:  # stopped before its first checkpoint: nothing to lose, start it over
        say(f"{run.path} has no checkpoint yet (the run saved nothing); starting from step 0")
        return None
    if ckpt.skipped:
        say(f"warning: skipped {'; '.join(ckpt.skipped)}; resuming from step {ckpt.step}")
    resume = Resume(ckpt, saved, writer=writer)
    total = _known_total(cfg, saved, ckpt)
    if total is not None and ckpt.step >= total:
        _finish(run, resume, say)
    return resume


def check_changes(cfg, run: RunDir, resume: Resume | None, ident: dict, total: int, say) -> bool:
    """Refuse settings or data that differ from the run's unless --allow-changes; True when the
    resumed run has already done all `total` updates (nothing left to do)."""
    if resume is None:
        return False
    if resume.ckpt.step >= total:
        _finish(run, resume, say)
        return True
    _, soft = compare_settings(_normalized(resume.saved.get("settings", {})), ident["settings"])
    old_hash = resume.saved.get("data_hash")
    if old_hash is not None and old_hash != ident["data_hash"]:
        soft.append(("data_hash", old_hash, ident["data_hash"]))
    if soft and not cfg.allow_changes:
        raise RunError(
            f"--resume: these differ from the run in {run.path}: {describe(soft)}; "
            "nothing was changed. Resume with the run's settings and data, or add "
            "--allow-changes to continue with these (the change is recorded)"
        )
    resume.changes = soft
    return False


def start_writing(cfg, run: RunDir, resume: Resume | None, ident: dict, adapter_cfg: dict, say):
    """The run's first writes, once every check has passed."""
    if resume is None:
        run.clear_provisional()
        run.write_identity(ident)
    else:
        _heal(run, resume, say)
        run.truncate_metrics(resume.ckpt.step)
        if resume.changes:
            _record_changes(run, resume, ident, say)
    atomic_write_text(run.path / CONFIG, json.dumps(adapter_cfg, indent=2))


def _check_empty(run: RunDir) -> None:
    if not run.has_saved_work():
        return
    if run.is_ours():
        raise RunError(
            f"--adapter-path {run.path} already holds a run; pass --resume to continue it "
            "or choose another --adapter-path (nothing was overwritten)"
        )
    names = run.entries()
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise RunError(
        f"--adapter-path {run.path} holds files that are not an mlx_dpo run ({shown}); "
        "choose another --adapter-path (nothing was overwritten)"
    )


def _known_total(cfg, saved: dict, ckpt: checkpoint.Checkpoint) -> int | None:
    """The run's length when it is known before the data is read."""
    if cfg.epochs is None:
        return cfg.iters
    same_epochs = saved.get("settings", {}).get("epochs") == cfg.epochs
    return ckpt.meta.get("total") if same_epochs else None


def _finish(run: RunDir, resume: Resume, say) -> None:
    resume.finished = True
    if resume.writer:
        _heal(run, resume, say)
    say(
        f"the run in {run.path} is finished (step {resume.ckpt.step}); nothing to do. "
        f"To train longer, resume with a larger --iters."
    )


def _heal(run: RunDir, resume: Resume, say) -> None:
    """Undo what a kill left: temporaries, broken checkpoints, adapters behind the checkpoint."""
    fixed = run.remove_temporaries()
    if resume.ckpt.broken:
        checkpoint.set_aside(run.path, resume.ckpt.broken)
        fixed += [f"set aside checkpoint {name}" for name in resume.ckpt.broken]
    if not _same_arrays(run.path / ADAPTERS, resume.ckpt.adapters):
        checkpoint.save_safetensors(run.path / ADAPTERS, resume.ckpt.adapters, "heal", 0)
        fixed.append(f"{ADAPTERS} restored from step {resume.ckpt.step}")
    checkpoint.set_latest(run.path, resume.ckpt.step)
    if fixed:
        say(f"healed after an interrupted write: {', '.join(fixed)}")


def _same_arrays(path: Path, arrays: dict[str, mx.array]) -> bool:
    try:
        on_disk = mx.load(str(path))
    except (OSError, ValueError, RuntimeError):
        return False
    return on_disk.keys() == arrays.keys() and all(
        mx.array_equal(on_disk[k], v).item() for k, v in arrays.items()
    )


def _record_changes(run: RunDir, resume: Resume, ident: dict, say) -> None:
    step = resume.ckpt.step
    changes = {name: {"saved": old, "given": new} for name, old, new in resume.changes}
    history = [*resume.saved.get("changes", []), {"step": step, "changes": changes}]
    run.write_identity({**ident, "changes": history})
    run.append_metrics({"split": "change", "step": step, "changes": changes})
    say(f"resuming at step {step} with changes: {describe(resume.changes)} (recorded in run.json)")


def _normalized(saved_settings: dict) -> dict:
    """Saved settings with local paths absolute (runs from before run.json saved them as given)."""
    values = dict(saved_settings)
    for name in PATH_SETTINGS:
        if values.get(name) and Path(values[name]).exists():
            values[name] = str(Path(values[name]).resolve())
    return values
