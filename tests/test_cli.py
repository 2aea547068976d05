"""The command line: flags map onto TrainConfig one-to-one, precedence, and user errors."""

import dataclasses
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny import write_pairs

from mlx_dpo import cli
from mlx_dpo.config import TrainConfig


def run(*args):
    return CliRunner().invoke(cli.main, list(args))


def test_version_and_help():
    assert run("--version").output.startswith("mlx_dpo, version")
    out = run("train", "--help").output
    for flag in (
        "--adapter-path",
        "--iters",
        "--batch-size",
        "--learning-rate",
        "--steps-per-report",
        "--steps-per-eval",
        "--save-every",
        "--grad-checkpoint",
        "--num-layers",
        "--seed",
    ):
        assert flag in out  # mlx_lm.lora's names where the concept is the same


def test_every_config_field_is_a_flag_that_the_package_reads():
    """A flag that does nothing is a bug: every TrainConfig field must be read somewhere besides
    the modules that declare it and generate flags from it (config.py, cli.py, rundir.py)."""
    import re

    import mlx_dpo

    params = {p.name for p in cli.train.params} - {"config_path"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert params == fields
    package = Path(mlx_dpo.__file__).parent
    skip = {"config.py", "cli.py", "rundir.py"}
    sources = [p.read_text() for p in package.rglob("*.py") if p.name not in skip]
    unread = [f for f in fields if not any(re.search(rf"\b{f}\b", text) for text in sources)]
    assert unread == []


def test_flags_override_yaml_override_defaults(tmp_path, monkeypatch):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("model: some/model\niters: 7\nbeta: 0.3\nloss-type: [ipo]\n")
    cfg = cli.build_config(str(yaml_file), {"iters": 2, "beta": None, "model": None})
    assert (cfg.iters, cfg.beta, cfg.loss_type, cfg.model) == (2, 0.3, ["ipo"], "some/model")
    default = TrainConfig()
    cfg = cli.build_config(None, {"model": "x/y"})
    assert (cfg.iters, cfg.beta) == (default.iters, default.beta)


def test_loss_flags_reach_the_config():
    ctx = cli.train.make_context(
        "train",
        [
            "--loss-type",
            "sigmoid,sft",
            "--loss-weights",
            "1",
            "--loss-weights",
            "0.5",
            "--label-smoothing",
            "0.1",
            "--f-divergence-type",
            "js_divergence",
            "--no-ipo-length-normalize",
            "--reference-free",
            "--model",
            "a/b",
        ],
    )
    flags = {k: v for k, v in ctx.params.items() if k != "config_path"}
    cfg = cli.build_config(None, flags)
    kw = cfg.loss_kwargs()
    assert kw["loss_type"] == ["sigmoid", "sft"] and kw["loss_weights"] == [1.0, 0.5]
    assert kw["label_smoothing"] == 0.1 and kw["f_divergence_type"] == "js_divergence"
    assert kw["ipo_length_normalize"] is False and kw["reference_free"] is True


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "/nonexistent/data.jsonl"], "/nonexistent/data.jsonl"),
        (["--beta", "0"], "beta must be > 0"),
        (["--loss-type", "sigmoid,hinge", "--loss-weights", "1"], "one weight per loss type"),
        (["--model", "/nonexistent/model", "--data", "DATA"], "/nonexistent/model"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
    ],
)
def test_user_errors_exit_2_with_one_line(tmp_path, args, message):
    write_pairs(tmp_path / "d.jsonl", 8)
    args = [str(tmp_path / "d.jsonl") if a == "DATA" else a for a in args]
    result = run("train", "--adapter-path", str(tmp_path / "run"), *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_unknown_yaml_key_is_an_error(tmp_path):
    (tmp_path / "c.yaml").write_text("itres: 3\n")
    result = run("train", "--config", str(tmp_path / "c.yaml"))
    assert result.exit_code == 2 and "unknown setting(s) itres" in result.output


def test_bad_choice_is_rejected_by_click():
    result = run("train", "--truncation-mode", "middle")
    assert result.exit_code == 2 and "middle" in result.output


def test_smoke_run_and_resolved_config_saved(tiny_model_path, tmp_path):
    data = tmp_path / "d.jsonl"
    write_pairs(data, 24)
    run_dir = tmp_path / "run"
    result = run(
        "train",
        "--model",
        str(tiny_model_path),
        "--data",
        str(data),
        "--adapter-path",
        str(run_dir),
        "--iters",
        "2",
        "--steps-per-report",
        "1",
        "--beta",
        "0.2",
        "--no-reference-cache",
        "--max-length",
        "64",
    )
    assert result.exit_code == 0, result.output
    assert "iter 2 | loss" in result.output
    saved = json.loads((run_dir / "adapter_config.json").read_text())
    assert saved["beta"] == 0.2 and saved["fine_tune_type"] == "lora" and "lora_parameters" in saved
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) >= 2


def test_yaml_numbers_written_as_text_are_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5 as the string "1e-5"; the field's type decides
    (tmp_path / "c.yaml").write_text("learning_rate: 1e-5\nbeta: 1e-1\niters: 3.0\n")
    cfg = cli.build_config(str(tmp_path / "c.yaml"), {"model": "a/b"})
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.1 and cfg.iters == 3
    assert isinstance(cfg.learning_rate, float) and isinstance(cfg.iters, int)


@pytest.mark.parametrize(
    "line, message",
    [
        ("iters: ten", "iters: expected a whole number, got 'ten'"),
        ("iters: 2.5", "iters: expected a whole number, got 2.5"),
        ("beta: null", "beta: expected a finite number, got null"),
        ("lora_scale: abc", "lora_scale: expected a finite number, got 'abc'"),
        ("model: [1, 2]", "model: expected a string, got [1, 2]"),
        ("learning_rate: .nan", "learning_rate: expected a finite number, got nan"),
        ("reference_free: maybe", "reference_free: expected true or false, got 'maybe'"),
        ("loss_weights: [1, x]", "loss_weights: expected a finite number, got 'x'"),
    ],
)
def test_bad_yaml_values_are_one_line_before_anything_loads(tmp_path, line, message):
    (tmp_path / "c.yaml").write_text(line + "\n")
    result = run("train", "--config", str(tmp_path / "c.yaml"), "--adapter-path", str(tmp_path))
    assert result.exit_code == 2, result.output
    errors = [x for x in result.output.splitlines() if x.startswith("Error:")]
    assert errors == [f"Error: {tmp_path / 'c.yaml'}: {message}"]
    assert "Traceback" not in result.output and "blas:" not in result.output


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_flags_are_rejected_at_parse_time(value):
    result = run("train", "--learning-rate", value)
    assert result.exit_code == 2 and "expected a finite number" in result.output
    result = run("train", "--loss-weights", value)
    assert result.exit_code == 2 and "expected a finite number" in result.output


def test_missing_optional_package_is_a_user_error_with_the_install_command(tmp_path):
    from mlx_dpo.report import check_sinks

    with pytest.raises(Exception, match="pip install"):
        check_sinks(["wandb"])  # not a test dependency
