"""A picture of a run: loss, reward accuracy, margins and chosen/rejected rewards over steps.

`plot_run(run_dir)` reads `run_dir/metrics.jsonl` (one JSON object per report, see report.py)
and writes `run_dir/metrics.png`: a 2x2 grid, train as lines and validation as lines with
markers. It draws through matplotlib's object API on the Agg canvas (no pyplot, no global
backend switch), and returns None when matplotlib is not installed (`pip install matplotlib`)
so a training run never fails for want of a plot.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from mlx_dpo.config import ConfigError

# (panel title, y label, [(metric key, legend name)], (legend name or None, y) of a dotted
# reference line, or None)
PANELS = (
    ("Loss", "loss", [("loss", "loss")], None),
    (
        "Reward accuracy",
        "share of pairs",
        [("rewards/accuracies", "accuracy")],
        ("chance", 0.5),
    ),
    ("Reward margin", "chosen - rejected", [("rewards/margins", "margin")], (None, 0.0)),
    (
        "Rewards",
        "beta * log(pi / pi_ref)",
        [("rewards/chosen", "chosen"), ("rewards/rejected", "rejected")],
        (None, 0.0),
    ),
)
COLORS = {"train": "tab:blue", "valid": "tab:orange", "chosen": "tab:green", "rejected": "tab:red"}


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl; a resumed run's repeated steps keep their last report."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file (a run directory holds metrics.jsonl)")
    latest: dict[tuple[str, int], dict] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            latest[(record["split"], int(record["step"]))] = record
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise ConfigError(
                f"{path}:{lineno}: not a metrics record (a JSON object with step and split)"
            ) from None
    return sorted(latest.values(), key=lambda r: (r["split"], int(r["step"])))


def _series(records: list[dict], split: str, key: str) -> tuple[list[int], list[float]]:
    points = [(int(r["step"]), r[key]) for r in records if r["split"] == split and key in r]
    return [s for s, _ in points], [float(v) for _, v in points]


def plot_metrics(
    records: list[dict],
    output: str | Path,
    *,
    title: str | None = None,
    initial_loss: float | None = None,
) -> dict:
    """Draw the 2x2 grid of `records` into the PNG `output`; `initial_loss` (the loss where
    policy == reference, ln 2 for sigmoid DPO) is drawn as a dotted line on the loss panel.

    Returns {panel title: [legend labels of the data series drawn]}, e.g.
    {"Loss": ["train loss", "valid loss"], ...}; reference lines are not listed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    drawn: dict[str, list[str]] = {}
    for ax, (panel, ylabel, keys, ref) in zip(axes.flat, PANELS, strict=True):
        if panel == "Loss" and initial_loss is not None:
            ref = (f"step 0 ({initial_loss:.3f})", initial_loss)
        drawn[panel] = []
        for split in ("train", "valid"):
            for key, name in keys:
                steps, values = _series(records, split, key)
                if not steps:
                    continue
                label = f"{split} {name}"
                # One color per split; on the rewards panel one per chosen/rejected instead.
                color = COLORS[name] if len(keys) > 1 else COLORS[split]
                style = "-" if split == "train" else "--"
                marker = None if split == "train" and len(steps) > 30 else "o"
                ax.plot(steps, values, style, color=color, marker=marker, ms=3.5, label=label)
                drawn[panel].append(label)
        if ref is not None and drawn[panel]:
            ax.axhline(ref[1], color="gray", lw=0.8, ls=":", label=ref[0] or "_nolegend_")
        if panel == "Reward accuracy":
            ax.set_ylim(-0.02, 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if drawn[panel]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, format="png")
    return drawn


def plot_run(run_dir: str | Path, output: str | Path | None = None) -> Path | None:
    """Plot `run_dir/metrics.jsonl` to `output` (default `run_dir/metrics.png`).

    Returns the PNG's path, or None when matplotlib is not installed. Raises ConfigError when
    the run has no readable metrics.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    if not records:
        raise ConfigError(f"{run_dir / 'metrics.jsonl'}: no reports yet")
    output = Path(output) if output is not None else run_dir / "metrics.png"
    plot_metrics(records, output, title=str(run_dir), initial_loss=_initial_loss(run_dir))
    return output


def _initial_loss(run_dir: Path) -> float | None:
    """ln 2 when the run trained plain sigmoid DPO (every pair's loss at step 0), else None."""
    try:
        config = json.loads((run_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    sigmoid = config.get("loss_type") in (["sigmoid"], "sigmoid")
    plain = not config.get("rpo_alpha") and not config.get("reference_free")
    return math.log(2) if sigmoid and plain else None
