"""What `mlx_dpo iterate` reports: a line per round, the before/after summary, rounds.jsonl and
its plot (`mlx_dpo plot RUN` on an iterate run draws this one).

A round's report: the samples' mean reward, the share of prompts whose best sample meets
`--target`, pairs kept and dropped (with why), the round's last DPO metrics (train and, when
the pairs had a held-out slice, valid), and the held-out prompts' mean reward and target shares
(`eval`) when `--eval-prompts` is given. Round 0 holds the held-out figures before training.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlx_dpo.rundir import atomic_write_text

ROUNDS = "rounds.jsonl"
DPO_KEYS = ("loss", "rewards/accuracies", "rewards/margins")


def last_metrics(train_dir: Path) -> dict:
    """The last train and valid reports of a round's training run (empty when it trained none)."""
    file = train_dir / "metrics.jsonl"
    out: dict = {}
    if not file.is_file():
        return out
    for line in file.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("split") in ("train", "valid"):
            keep = {k: record[k] for k in ("step", *DPO_KEYS) if k in record}
            out[record["split"]] = keep
    return out


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.3g}"


def format_round(report: dict, icfg) -> str:
    parts = [f"round {report['round']}: mean reward {_num(report['mean_reward'])}"]
    if report.get("target_share") is not None:
        parts.append(f"best sample meets --target on {_pct(report['target_share'])} of prompts")
    dropped = ", ".join(f"{n} {why}" for why, n in report.get("dropped", {}).items())
    parts.append(f"{report['kept']} pairs kept" + (f" ({dropped} dropped)" if dropped else ""))
    for split in ("train", "valid"):
        if m := report.get(split):
            parts.append(
                f"DPO {split} loss {m.get('loss', float('nan')):.3f}, reward accuracy "
                f"{_pct(m.get('rewards/accuracies'))}, margin {m.get('rewards/margins', 0):.3f}"
            )
    if ev := report.get("eval"):
        parts.append(f"held-out mean reward {_num(ev['mean_reward'])}")
    return "; ".join(parts)


def print_summary(state: dict, icfg, log) -> None:
    """Before/after: held-out figures when there are held-out prompts, else the first and last
    rounds' samples (on the training prompts, before each round's update)."""
    from mlx_dpo.iterate_config import is_demo_reward

    rounds = state["rounds"]
    first, last = rounds[0], rounds[-1]
    log("")
    if state.get("before") and last.get("eval"):
        before, after = state["before"], last["eval"]
        log(
            f"Before/after {last['round']} round(s), on {after['prompts']} held-out prompts "
            f"({icfg.samples} samples each, temperature {icfg.temperature}):"
        )
        lines = [("mean reward", _num(before["mean_reward"]), _num(after["mean_reward"]))]
        if before.get("sample_target_share") is not None:
            what = (
                "sampled answers with the preferred behaviour"
                if is_demo_reward(icfg.reward)
                else f"sampled answers meeting --target {icfg.target:g}"
            )
            lines.append(
                (what, _pct(before["sample_target_share"]), _pct(after["sample_target_share"]))
            )
        width = max(len(what) for what, _, _ in lines) + 1
        for what, old, new in lines:
            log(f"  {what + ':':<{width}} {old:>6} -> {new}")
        key = "sample_target_share" if before.get("sample_target_share") is not None else None
        key = key or "mean_reward"
        show = _pct if key == "sample_target_share" else _num
        steps = [show(before[key])] + [show(r["eval"][key]) for r in rounds if r.get("eval")]
        log(f"  held-out, before and after each round: {', '.join(steps)}")
    else:
        log(f"Rounds 1 to {last['round']}, sampled answers on the training prompts:")
        log(f"  mean reward: {_num(first['mean_reward'])} (round 1) -> {_num(last['mean_reward'])}")
    log(f"  pairs kept per round: {', '.join(str(r['kept']) for r in rounds)}")


def write_rounds(root: Path, state: dict) -> None:
    rows = []
    if state.get("before"):
        rows.append({"round": 0, "eval": state["before"]})
    rows += state["rounds"]
    atomic_write_text(root / ROUNDS, "".join(json.dumps(r) + "\n" for r in rows))


def read_rounds(root: Path) -> list[dict]:
    from mlx_dpo.config import ConfigError

    file = Path(root) / ROUNDS
    try:
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise ConfigError(f"{file}: unreadable ({e})") from None


def is_iterate_run(path: str | Path) -> bool:
    return (Path(path) / ROUNDS).is_file()


def plot_rounds(root: str | Path, output: str | Path | None = None) -> Path | None:
    """rounds.png: reward, target share, pairs, DPO metrics per round; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    rows = read_rounds(root)
    trained = [r for r in rows if r["round"] > 0]
    held = [r for r in rows if r.get("eval")]
    fig = Figure(figsize=(11, 7.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots(2, 2)

    def line(a, rs, get, label, style="-o"):
        points = [(r["round"], get(r)) for r in rs if get(r) is not None]
        if points:
            a.plot(*zip(*points, strict=True), style, label=label, ms=4)

    line(ax[0, 0], trained, lambda r: r.get("mean_reward"), "samples (before the round's update)")
    line(
        ax[0, 0], held, lambda r: r["eval"].get("mean_reward"), "held-out (after the round)", "--s"
    )
    line(ax[0, 1], trained, lambda r: r.get("target_share"), "prompts whose best sample meets it")
    line(ax[0, 1], held, lambda r: r["eval"].get("sample_target_share"), "held-out samples", "--s")
    rounds = [r["round"] for r in trained]
    ax[1, 0].bar(rounds, [r["kept"] for r in trained], label="kept", color="tab:green")
    ax[1, 0].bar(
        rounds,
        [sum(r.get("dropped", {}).values()) for r in trained],
        bottom=[r["kept"] for r in trained],
        label="dropped (ties, margin, unscored)",
        color="tab:gray",
    )
    for key in DPO_KEYS:
        line(ax[1, 1], trained, lambda r, k=key: r.get("train", {}).get(k), f"train {key}")
    titles = ("Mean reward", "Share meeting --target", "Pairs", "DPO metrics (end of round)")
    for a, title in zip(ax.flat, titles, strict=True):
        a.set_title(title)
        a.set_xlabel("round")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize="small")
    fig.suptitle(str(root))
    output = Path(output) if output is not None else Path(root) / "rounds.png"
    fig.savefig(output, format="png")
    return output
