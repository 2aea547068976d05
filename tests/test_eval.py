"""`mlx_dpo eval`: per-pair scores and split metrics against the training code's own numbers.

A short run trains adapters on a tiny model; the expected log-probs are recomputed here
independently of the package's log-prob head (tests/tiny.plain_pair_logps: full logits of one
unpadded row at a time, log-softmax in numpy), with the base as the adapters-off model, and the
DPO loss is written out in numpy.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from tiny import plain_pair_logps

from mlx_dpo import model as model_lib
from mlx_dpo.cli import main
from mlx_dpo.config import TrainConfig
from mlx_dpo.evaluate import config_for


def rows(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        a, b = 1 + i % 5, 2 + i // 5
        out.append(
            {
                "prompt": f"What is {a} plus {b}? ",
                "chosen": f"{a} plus {b} is {a + b}.",
                "rejected": "Sorry, I can not do sums.",
            }
        )
    return out


def write_jsonl(path, items):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_path, tmp_path_factory):
    """A 3-step run with an explicit validation file; its reference cache in a temp dir."""
    from mlx_dpo.run import run_training

    root = tmp_path_factory.mktemp("eval-run")
    write_jsonl(root / "data" / "train.jsonl", rows(12))
    write_jsonl(root / "data" / "valid.jsonl", rows(5, start=12))
    cfg = TrainConfig(
        model=str(tiny_model_path),
        data=str(root / "data"),
        adapter_path=str(root / "run"),
        iters=3,
        batch_size=2,
        learning_rate=1e-5,
        steps_per_report=1,
        steps_per_eval=10,
        num_layers=-1,
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_DPO_CACHE", str(root / "cache"))
        run_training(cfg, log=lambda *_: None)
        yield cfg


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))


def invoke(*args: str) -> tuple[dict, str]:
    """Run `mlx_dpo eval ... --json`; returns (metrics, full output)."""
    result = CliRunner().invoke(main, ["eval", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1]), result.output


def read_scores(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_scores_and_metrics_match_the_training_code(run, tmp_path):
    from mlx_dpo.losses import dpo_loss
    from mlx_dpo.run import load_pairs

    metrics, _ = invoke("--adapter-path", run.adapter_path, "--output", str(tmp_path / "s.jsonl"))
    scores = read_scores(tmp_path / "s.jsonl")

    # The expectation, computed independently: full logits of one row at a time, numpy.
    loaded = model_lib.load(run.model)
    _, valid = load_pairs(run, loaded.tokenizer, log=lambda *_: None)
    base = plain_pair_logps(loaded.model, valid)
    model_lib.load_adapter_dir(loaded.model, run.adapter_path)
    policy = plain_pair_logps(loaded.model, valid)
    with model_lib.adapters_off(loaded.model):
        off = plain_pair_logps(loaded.model, valid)

    assert metrics["split"] == "valid" and metrics["pairs"] == len(valid) == len(scores) == 5
    assert [s["source"] for s in scores] == [p.source for p in valid]
    assert all("valid.jsonl" in s["source"] for s in scores)
    got = {k: np.array([s[k] for s in scores]) for k in scores[0] if k != "source"}
    np.testing.assert_allclose(got["chosen_logps"], policy[0], rtol=1e-5)
    np.testing.assert_allclose(got["rejected_logps"], policy[1], rtol=1e-5)
    np.testing.assert_allclose(got["reference_chosen_logps"], base[0], rtol=1e-5)
    np.testing.assert_allclose(got["reference_rejected_logps"], base[1], rtol=1e-5)
    np.testing.assert_allclose(got["reference_chosen_logps"], off[0], rtol=1e-5)
    np.testing.assert_array_equal(got["chosen_tokens"], [len(p.chosen_ids) for p in valid])

    beta = run.beta
    chosen_reward = beta * (got["chosen_logps"] - got["reference_chosen_logps"])
    rejected_reward = beta * (got["rejected_logps"] - got["reference_rejected_logps"])
    np.testing.assert_allclose(got["chosen_reward"], chosen_reward, atol=1e-5)
    np.testing.assert_allclose(got["rejected_reward"], rejected_reward, atol=1e-5)
    assert np.abs(chosen_reward - rejected_reward).max() > 1e-3  # the adapters learned something

    # sigmoid DPO by hand: -log sigmoid(margin) = log(1 + exp(-margin))
    margins = chosen_reward - rejected_reward
    losses = np.logaddexp(0.0, -margins)
    np.testing.assert_allclose(got["loss"], losses, atol=1e-5)
    assert metrics["loss"] == pytest.approx(losses.mean(), abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(margins.mean(), abs=1e-5)
    assert metrics["rewards/accuracies"] == pytest.approx(np.mean(margins > 0))
    assert metrics["logps/chosen"] == pytest.approx(policy[0].mean(), rel=1e-5)
    assert metrics["preference_accuracy"] == pytest.approx(np.mean(policy[0] > policy[1]))
    assert metrics["reference_preference_accuracy"] == pytest.approx(np.mean(base[0] > base[1]))
    out = dpo_loss(*(np.float32(a) for a in (*policy, *base)), beta=beta)
    assert metrics["loss"] == pytest.approx(out.loss.item(), abs=1e-5)

    # and the trainer's own last validation report on the same adapters
    lines = (Path(run.adapter_path) / "metrics.jsonl").read_text().splitlines()
    reports = [json.loads(line) for line in lines]
    last_valid = [r for r in reports if r["split"] == "valid"][-1]
    for key in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        assert metrics[key] == pytest.approx(last_valid[key], rel=1e-4, abs=1e-5), key


def test_human_readable_output(run):
    result = CliRunner().invoke(main, ["eval", "--adapter-path", run.adapter_path])
    assert result.exit_code == 0, result.output
    assert "metrics on the valid split (5 pairs)" in result.output
    assert "reward accuracy" in result.output and "preference accuracy" in result.output


def test_loss_flags_override_the_runs_settings(run):
    default, _ = invoke("--adapter-path", run.adapter_path)
    higher, _ = invoke("--adapter-path", run.adapter_path, "--beta", "0.5")
    # rewards are beta * log-ratio: 5x the run's beta of 0.1
    assert higher["rewards/margins"] == pytest.approx(5 * default["rewards/margins"], rel=1e-5)
    assert higher["logps/chosen"] == pytest.approx(default["logps/chosen"])
    hinge, _ = invoke("--adapter-path", run.adapter_path, "--loss-type", "hinge")
    assert hinge["loss"] != pytest.approx(default["loss"])  # same rewards, another loss
    assert hinge["rewards/margins"] == pytest.approx(default["rewards/margins"], rel=1e-5)


def test_base_model_alone_is_its_own_reference(run):
    metrics, _ = invoke("--model", run.model, "--data", run.data)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"] == 0 and metrics["rewards/margins"] == 0
    assert metrics["preference_accuracy"] == metrics["reference_preference_accuracy"]


def test_split_choice_and_fallbacks(tiny_model_path, tmp_path):
    model = str(tiny_model_path)
    full = tmp_path / "full"
    write_jsonl(full / "train.jsonl", rows(8))
    write_jsonl(full / "valid.jsonl", rows(3, start=8))
    write_jsonl(full / "test.jsonl", rows(2, start=11))
    scores = tmp_path / "s.jsonl"
    for split, n in ((None, 3), ("test", 2), ("train", 8)):
        extra = ["--split", split] if split else []
        metrics, _ = invoke("--model", model, "--data", str(full), "--output", str(scores), *extra)
        assert metrics["split"] == (split or "valid") and metrics["pairs"] == n
        assert all(f"{split or 'valid'}.jsonl" in s["source"] for s in read_scores(scores))

    # no validation file: the split training held out (same fraction and seed)
    write_jsonl(tmp_path / "carve" / "train.jsonl", rows(8))
    metrics, _ = invoke(
        "--model", model, "--data", str(tmp_path / "carve"), "--valid-fraction", "0.25"
    )
    assert metrics["split"] == "valid" and metrics["pairs"] == 2

    # only a test file
    write_jsonl(tmp_path / "only-test" / "test.jsonl", rows(2))
    metrics, _ = invoke("--model", model, "--data", str(tmp_path / "only-test"))
    assert metrics["split"] == "test"

    result = CliRunner().invoke(
        main, ["eval", "--model", model, "--data", str(tmp_path / "only-test"), "--split", "valid"]
    )
    assert result.exit_code == 2
    assert "no valid split; found: test (2 rows)" in result.output


def test_user_errors_exit_2_with_one_line(run, tmp_path):
    runner = CliRunner()
    missing = runner.invoke(main, ["eval", "--adapter-path", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.output.strip() == f"Error: --adapter-path {tmp_path / 'nope'}: no such directory"

    (tmp_path / "empty").mkdir()
    empty = runner.invoke(main, ["eval", "--adapter-path", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and "not an adapter directory" in empty.output

    half = tmp_path / "half"
    half.mkdir()
    (half / "adapter_config.json").write_text(
        json.dumps({"model": run.model, "loss_type": ["sigmoid"], "data": run.data})
    )
    no_weights = runner.invoke(main, ["eval", "--adapter-path", str(half)])
    assert no_weights.exit_code == 2 and "not an adapter directory" in no_weights.output

    no_data = runner.invoke(main, ["eval", "--model", run.model])
    assert no_data.exit_code == 2 and "--data is required" in no_data.output


def test_config_for_adapters_trained_elsewhere(tmp_path):
    # mlx-lm's own adapter_config.json: only the model is taken from it
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "model": "org/name",
                "fine_tune_type": "lora",
                "num_layers": 4,
                "lr_schedule": None,
                "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
            }
        )
    )
    cfg = config_for(tmp_path, {"beta": 0.3, "data": None})
    assert cfg.model == "org/name" and cfg.beta == 0.3 and cfg.lr_schedule == "cosine"


def test_run_from_an_init_adapter_keeps_it_in_the_reference(run, tmp_path):
    """A run started from --init-adapter has base + that adapter as its reference."""
    from dataclasses import replace

    from mlx_dpo.run import load_pairs, run_training

    second = replace(run, adapter_path=str(tmp_path / "second"), init_adapter=run.adapter_path)
    run_training(second, log=lambda *_: None)
    metrics, _ = invoke(
        "--adapter-path", second.adapter_path, "--output", str(tmp_path / "s.jsonl")
    )
    scores = read_scores(tmp_path / "s.jsonl")

    loaded = model_lib.load(run.model)
    _, valid = load_pairs(run, loaded.tokenizer, log=lambda *_: None)
    model_lib.load_adapter_dir(loaded.model, run.adapter_path)
    init = plain_pair_logps(loaded.model, valid)
    loaded.model.load_weights(str(Path(second.adapter_path) / "adapters.safetensors"), strict=False)
    policy = plain_pair_logps(loaded.model, valid)
    np.testing.assert_allclose([s["reference_chosen_logps"] for s in scores], init[0], rtol=1e-5)
    np.testing.assert_allclose([s["chosen_logps"] for s in scores], policy[0], rtol=1e-5)
    assert np.abs(policy[0] - init[0]).max() > 1e-3
    lines = (Path(second.adapter_path) / "metrics.jsonl").read_text().splitlines()
    last_valid = [json.loads(line) for line in lines if '"valid"' in line][-1]
    assert metrics["loss"] == pytest.approx(last_valid["loss"], rel=1e-4, abs=1e-5)
