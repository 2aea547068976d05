"""What the tool tells a user: help defaults (the demo's where it changes them, the run's for
eval/compare/fuse), the over-optimisation warning, fuse's closing line and its model card, and
the reference pass's batches."""

import io
import json
import re
from pathlib import Path

import numpy as np
import yaml
from click.testing import CliRunner
from tiny import make_adapter

from mlx_dpo import cli, demo, export, progress, reference
from mlx_dpo.config import TrainConfig
from mlx_dpo.data import PreferencePair
from mlx_dpo.export import model_card
from mlx_dpo.report import Reporter, collapse_warning


def help_of(*command: str) -> str:
    out = CliRunner().invoke(cli.main, [*command, "--help"], terminal_width=400).output
    return re.sub(r"\s+", " ", out)  # click wraps long help lines


def test_train_help_shows_the_defaults_and_the_demos_values():
    text = help_of("train")
    demo_values = yaml.safe_load((Path(demo.__file__).parent / "demo.yaml").read_text())
    defaults = TrainConfig()
    for name, value in demo_values.items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        assert f"{flag} " in text
        if name == "adapter_path":
            assert "[default: adapters] (demo: runs/demo, or -2, -3, ... when taken)" in text
        elif value != default:
            assert f"[default: {default}] (demo: {value})" in text, name
    assert "[default: 1024] (demo: 64)" in text  # spelled out once, by hand


def test_after_training_commands_default_to_the_runs_settings():
    for command, flag in (("eval", "--beta"), ("compare", "--max-length"), ("fuse", "--quantize")):
        text = help_of(command)
        option = text.split(f"{flag} ", 1)[1].split(" --", 1)[0]
        assert "[default: the run's]" in option, (command, option)
        assert "(demo:" not in option


def test_collapse_warning_rule():
    def m(chosen, accuracy, margin):
        return {"rewards/chosen": chosen, "rewards/accuracies": accuracy, "rewards/margins": margin}

    assert collapse_warning("train", 5, m(0.07, 1.0, 0.6)) is None  # healthy demo run
    assert collapse_warning("train", 5, m(-0.01, 1.0, 0.6)) is None  # a dip within 10% of margin
    assert collapse_warning("train", 5, m(-2.0, 0.6, 1.0)) is None  # accuracy is not high
    text = collapse_warning("valid", 75, m(-0.4, 0.95, 1.5))
    assert "step 75" in text and "-0.400" in text and "95%" in text
    for advice in ("--learning-rate", "--beta", "--rpo-alpha"):
        assert advice in text


def test_reporter_warns_once_with_the_first_step():
    out = io.StringIO()
    reporter = Reporter(100, [], interactive=False, out=out)
    healthy = {
        "loss": 0.5,
        "rewards/chosen": 0.1,
        "rewards/accuracies": 1.0,
        "rewards/margins": 0.5,
    }
    collapsed = {**healthy, "rewards/chosen": -0.5, "rewards/margins": 2.0}
    reporter.log("train", 10, healthy)
    reporter.log("train", 20, collapsed)
    reporter.log("valid", 20, collapsed)
    reporter.log("train", 30, collapsed)
    warnings = [line for line in out.getvalue().splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "step 20" in warnings[0]


def test_fuse_says_where_and_writes_a_model_card(tiny_model_path, tmp_path):
    adapter = make_adapter(tiny_model_path, tmp_path / "run", beta=0.25, loss_type=["ipo"])
    rows = [
        {"step": 10, "split": "train", "loss": 0.61, "rewards/accuracies": 0.75},
        {"step": 10, "split": "valid", "loss": 0.6543, "rewards/accuracies": 0.8125},
    ]
    (adapter / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fused"
    args = ["fuse", "--adapter-path", str(adapter), "--output", str(out)]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert f"wrote the fused model to {out} (the base model is unchanged)" in result.output
    card = (out / "README.md").read_text()
    assert str(tiny_model_path) in card and str(adapter) in card
    assert "ipo" in card and "beta=0.25" in card
    assert "| valid | 10 | 0.6543 | 0.8125 |" in card  # the run's last validation metrics
    assert "More Information Needed" not in card


def test_model_card_without_metrics(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps(TrainConfig(model="org/m").to_dict()))
    card = model_card("org/m", tmp_path)
    assert "base_model: org/m" in card and "sigmoid" in card and "beta=0.1" in card
    assert "none recorded" in card


def pair(prompt: int, chosen: int, rejected: int) -> PreferencePair:
    return PreferencePair([1] * prompt, [2] * chosen, [3] * rejected, "t", "p")


def test_reference_batches_cover_every_pair_once_within_the_token_budget():
    rng = np.random.default_rng(0)
    pairs = [pair(int(p), int(c), int(r)) for p, c, r in rng.integers(1, 300, (200, 3))]
    batches = reference.length_batches(pairs, batch_size=4)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(pairs)))
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    padded = [-(-n // reference.PAD_TO) * reference.PAD_TO for n in lengths]
    budget = max(4 * max(padded), reference.MIN_BATCH_TOKENS)
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(padded[i] for i in batch) <= budget
    # short pairs share bigger batches: 32-token rows go 64 to a forward, not 4
    short = [pair(10, 22, 12)] * 200  # 32 tokens a row
    assert [len(b) for b in reference.length_batches(short, batch_size=4)] == [64, 64, 64, 8]


class EveryUpdate(progress.Progress):
    """A progress display that prints a line on every update (the real one: every 5 s)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "every_s": 0.0, "interactive": False})


def test_long_phases_show_count_rate_and_eta(tiny_model_path, tmp_path, monkeypatch):
    for module in (progress, reference, export):
        monkeypatch.setattr(module, "Progress", EveryUpdate)
    adapter = make_adapter(tiny_model_path, tmp_path / "run")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Say hello.\nSay goodbye.\n")
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": "Yes.", "rejected": "No."} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def run(*args: str) -> str:
        result = CliRunner().invoke(cli.main, list(args))
        assert result.exit_code == 0, result.output
        return result.output

    base = ["--adapter-path", str(adapter)]
    evaluated = ["--data", str(data), "--split", "train", "--valid-fraction", "0"]
    shown = run("eval", *base, *evaluated, "--no-reference-cache")
    shown += run("compare", *base, "--prompts", str(prompts), "--max-tokens", "3")
    shown += run("fuse", *base, "--output", str(tmp_path / "fused"))
    for label, total, unit in (
        ("reference pass", 5, "pairs"),
        ("evaluation", 5, "pairs"),
        ("generation", 4, "answers"),  # base and tuned answer per prompt
        ("fusing", 14, "layers"),  # every linear layer of the tiny model's 2 blocks
    ):
        line = re.search(rf"{label}: {total}/{total} {unit} \| [\d.]+ {unit}/s \| ETA 0:00", shown)
        assert line, (label, shown)
    assert re.search(r"writing: \d+/\d+ MB \| [\d.]+ MB/s", shown)
