"""`mlx_dpo plot` / plot_run: a PNG of a run's metrics with the expected series."""

from __future__ import annotations

import json
import math
import sys

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main
from mlx_dpo.plot import plot_metrics, plot_run, read_metrics

pytest.importorskip("matplotlib")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def record(split: str, step: int, loss: float) -> dict:
    r = {"step": step, "split": split, "loss": loss}
    r |= dict(
        zip(METRICS, (0.1 * step, -0.1 * step, min(1.0, 0.2 * step), 0.2 * step), strict=True)
    )
    if split == "train":
        r |= {"lr": 1e-5, "grad_norm": 1.0, "tokens_per_sec": 100.0, "peak_memory_gb": 0.1}
    return r


def write_run(path, records, config=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_plot_run_writes_png_with_train_and_valid_series(tmp_path):
    records = [record("train", s, 0.7 - 0.05 * s) for s in range(1, 11)]
    records += [record("valid", s, 0.7 - 0.04 * s) for s in (5, 10)]
    run = write_run(tmp_path / "run", records, {"loss_type": ["sigmoid"]})
    out = plot_run(run)
    assert out == run / "metrics.png"
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    series = plot_metrics(records, tmp_path / "again.png", initial_loss=math.log(2))
    assert series == {
        "Loss": ["train loss", "valid loss"],
        "Reward accuracy": ["train accuracy", "valid accuracy"],
        "Reward margin": ["train margin", "valid margin"],
        "Rewards": ["train chosen", "train rejected", "valid chosen", "valid rejected"],
    }


def test_train_only_run_and_explicit_output(tmp_path):
    run = write_run(tmp_path / "run", [record("train", s, 0.6) for s in (1, 2)])
    out = plot_run(run, tmp_path / "figs" / "run.png")
    assert out == tmp_path / "figs" / "run.png" and out.read_bytes()[:8] == PNG_SIGNATURE
    series = plot_metrics(read_metrics(run / "metrics.jsonl"), tmp_path / "x.png")
    assert series["Loss"] == ["train loss"] and series["Rewards"] == [
        "train chosen",
        "train rejected",
    ]


def test_resumed_run_keeps_the_last_report_of_a_step(tmp_path):
    # a resume from the step-2 checkpoint appends steps 3.. again after a crash at step 4
    records = [record("train", s, 1.0) for s in (1, 2, 3, 4)]
    records += [record("train", s, 0.5) for s in (3, 4, 5)]
    run = write_run(tmp_path / "run", records)
    kept = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in kept] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in kept] == [1.0, 1.0, 0.5, 0.5, 0.5]


def test_plot_run_is_none_without_matplotlib(tmp_path, monkeypatch):
    run = write_run(tmp_path / "run", [record("train", 1, 0.6)])
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert plot_run(run) is None
    assert not (run / "metrics.png").exists()
    result = CliRunner().invoke(main, ["plot", str(run)])
    assert result.exit_code == 2
    assert "pip install matplotlib" in result.output


def test_cli_plot(tmp_path):
    run = write_run(tmp_path / "run", [record("train", 1, 0.6), record("valid", 1, 0.65)])
    result = CliRunner().invoke(main, ["plot", str(run), "--output", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE


def test_cli_plot_user_errors(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["plot", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert "metrics.jsonl: no such file" in missing.output
    bad = write_run(tmp_path / "bad", [])
    (bad / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\nnot json\n')
    result = runner.invoke(main, ["plot", str(bad)])
    assert result.exit_code == 2
    assert "metrics.jsonl:2: not a metrics record" in result.output


def test_plot_of_a_real_run(tiny_model_path, tmp_path, monkeypatch):
    from mlx_dpo.config import TrainConfig
    from mlx_dpo.run import run_training

    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))
    rows = [
        {
            "prompt": f"What is {a} plus {b}? ",
            "chosen": f"{a} plus {b} is {a + b}.",
            "rejected": "No.",
        }
        for a in range(1, 4)
        for b in range(1, 4)
    ]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = TrainConfig(
        model=str(tiny_model_path),
        data=str(data),
        adapter_path=str(tmp_path / "run"),
        iters=4,
        batch_size=2,
        steps_per_report=1,
        steps_per_eval=2,
        valid_fraction=0.3,
        learning_rate=1e-4,
    )
    run_training(cfg, log=lambda *_: None)
    out = plot_run(tmp_path / "run")
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    series = plot_metrics(read_metrics(tmp_path / "run" / "metrics.jsonl"), tmp_path / "x.png")
    assert series["Loss"] == ["train loss", "valid loss"]
    assert series["Rewards"] == ["train chosen", "train rejected", "valid chosen", "valid rejected"]
