"""The settings of a finished run, read back for `eval`, `compare` and `fuse` (MLX-free, so a
wrong --adapter-path is reported before anything heavy is imported)."""

from __future__ import annotations

from pathlib import Path

from mlx_dpo.config import TrainConfig
from mlx_dpo.rundir import RunDir


def read_adapter_config(adapter_path: str | Path) -> dict:
    return RunDir(Path(adapter_path)).adapter_config()


def config_for(adapter_path: str | Path | None, overrides: dict) -> TrainConfig:
    """TrainConfig defaults < the settings saved in `adapter_path`/adapter_config.json <
    `overrides` (None values are ignored). An adapter trained by mlx-lm (not mlx_dpo) only
    contributes its `model`."""
    saved = read_adapter_config(adapter_path) if adapter_path is not None else {}
    known = {f for f in TrainConfig.__dataclass_fields__}
    if "loss_type" in saved:  # ours: the full, once-validated TrainConfig of the run
        values = {k: v for k, v in saved.items() if k in known}
    else:
        values = {"model": saved["model"]} if isinstance(saved.get("model"), str) else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    if "data" in given and "valid_fraction" not in given:
        # Data given here is scored whole; the run's held-out slice only applies to its own data.
        given["valid_fraction"] = 0.0
    values.update(given)
    values.update(resume=False, allow_changes=False, adapter_path=str(adapter_path or "adapters"))
    source = f"{adapter_path}/adapter_config.json" if adapter_path else "flags"
    return TrainConfig.from_dict(values, source=source)
