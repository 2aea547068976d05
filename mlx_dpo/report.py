"""Reporting: one fixed-field line per report (or a progress bar on a terminal), metrics.jsonl,
and optional sinks (wandb, TensorBoard) behind one small interface. Only rank 0 reports."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Protocol

from mlx_dpo.config import ConfigError

SHORT = {
    "loss": "loss",
    "rewards/accuracies": "acc",
    "rewards/margins": "margin",
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
}


class Sink(Protocol):
    def log(self, split: str, step: int, metrics: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """metrics.jsonl: one JSON object per report: {"step", "split", <metric names>...}."""

    def __init__(self, path: Path, append: bool = False):
        self.file = open(path, "a" if append else "w", buffering=1)

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        self.file.write(json.dumps({"step": step, "split": split, **metrics}) + "\n")

    def close(self) -> None:
        self.file.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict):
        import wandb  # optional extra

        self.run = wandb.init(project="mlx_dpo", dir=str(run_dir), config=config)

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        prefix = "" if split == "train" else "eval/"
        self.run.log({prefix + k: v for k, v in metrics.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter  # optional extra

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(f"{split}/{k}", v, step)

    def close(self) -> None:
        self.writer.close()


# The packages each optional sink imports, and the command that installs them.
SINK_PACKAGES = {
    "wandb": (("wandb",), "pip install wandb"),
    "tensorboard": (("torch", "tensorboard"), "pip install torch==2.13.0 tensorboard"),
}


def check_sinks(names: list[str]) -> None:
    """Refuse, before any work, a sink that is unknown or whose package is not installed."""
    import importlib.util

    for name in names:  # TrainConfig has refused names that are not sinks
        packages, install = SINK_PACKAGES[name]
        missing = [p for p in packages if importlib.util.find_spec(p) is None]
        if missing:
            raise ConfigError(
                f"--report-to {name} needs {', '.join(missing)}, which is not installed: {install}"
            )


def make_sinks(names: list[str], run_dir: Path, config: dict) -> list[Sink]:
    check_sinks(names)
    makers = {
        "wandb": lambda: WandbSink(run_dir, config),
        "tensorboard": lambda: TensorBoardSink(run_dir),
    }
    return [makers[name]() for name in names]


def format_line(prefix: str, step: int, m: dict[str, float]) -> str:
    parts = [f"{prefix} {step}"]
    parts += [f"{SHORT[k]} {m[k]:.3f}" for k in SHORT if k in m]
    if "lr" in m:
        parts.append(f"lr {m['lr']:.1e}")
    if "grad_norm" in m:
        parts.append(f"gnorm {m['grad_norm']:.2f}")
    if "tokens_per_sec" in m:
        parts.append(f"{m['tokens_per_sec']:.0f} tok/s")
    if "pairs_per_sec" in m:
        parts.append(f"{m['pairs_per_sec']:.2f} pairs/s")
    if "peak_memory_gb" in m:
        gb = m["peak_memory_gb"]
        parts.append(f"{gb:.2f} GB" if gb >= 1 else f"{gb * 1000:.0f} MB")
    return " | ".join(parts)


def collapse_warning(split: str, step: int, m: dict[str, float]) -> str | None:
    """The classic DPO over-optimisation, or None: the chosen answers' reward falls below zero
    (the policy now likes the preferred answer less than the reference did) while reward
    accuracy stays high, because the rejected answers fall faster. The margin keeps growing and
    the loss looks healthy, but the model drifts from both answers and its samples degrade."""
    chosen, accuracy = m.get("rewards/chosen"), m.get("rewards/accuracies")
    if chosen is None or accuracy is None or accuracy < COLLAPSE_MIN_ACCURACY:
        return None
    # A dip by round-off or by a small share of the margin is normal early in a run.
    if chosen >= -COLLAPSE_SHARE * max(m.get("rewards/margins", 0.0), 0.0):
        return None
    return (
        f"warning: at step {step} ({split}) the chosen rewards fell below zero ({chosen:.3f}) "
        f"while reward accuracy stays {accuracy:.0%}: the model pushes the preferred answers "
        "down too, only less than the rejected ones (DPO over-optimisation; its samples may "
        "degrade). Try a lower --learning-rate, a higher --beta, or RPO: --rpo-alpha 1 adds "
        "the chosen answers' likelihood to the loss."
    )


COLLAPSE_MIN_ACCURACY = 0.9
COLLAPSE_SHARE = 0.1  # chosen reward below -10% of the margin


class Reporter:
    def __init__(self, total: int, sinks: list[Sink], *, enabled=True, interactive=None, out=None):
        self.total, self.sinks, self.enabled = total, sinks, enabled
        self.out = out or sys.stdout
        self.interactive = self.out.isatty() if interactive is None else interactive
        self.start = time.perf_counter()
        self.first_step: int | None = None
        self.last: dict[str, float] = {}
        self.warned_collapse = False  # said once per run

    def info(self, message: str) -> None:
        if self.enabled:
            self._clear_bar()
            print(message, file=self.out, flush=True)

    def progress(self, step: int) -> None:
        """Called every update; draws the bar on a terminal (no host sync needed)."""
        if self.first_step is None:
            self.first_step, self.start = step - 1, time.perf_counter()
        if not (self.enabled and self.interactive):
            return
        done = step - self.first_step
        eta = (time.perf_counter() - self.start) / max(done, 1) * (self.total - step)
        width = 24
        fill = int(width * step / max(self.total, 1))
        bar = "=" * fill + ">" * (fill < width) + " " * (width - fill - 1)
        stats = " ".join(
            f"{SHORT[k]} {self.last[k]:.3f}"
            for k in ("loss", "rewards/accuracies")
            if k in self.last
        )
        eta_text = f"{int(eta // 60)}:{int(eta % 60):02d}"
        self.out.write(f"\r[{bar}] {step}/{self.total} {stats} ETA {eta_text} ")
        self.out.flush()

    def _clear_bar(self) -> None:
        if self.interactive:
            self.out.write("\r\033[K")

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if split == "train":
            self.last = metrics
        for sink in self.sinks:
            sink.log(split, step, metrics)
        self.info(format_line("iter" if split == "train" else "valid", step, metrics))
        if not self.warned_collapse and (warning := collapse_warning(split, step, metrics)):
            self.warned_collapse = True
            self.info(warning)

    def close(self) -> None:
        if self.enabled:
            self._clear_bar()
        for sink in self.sinks:
            sink.close()
