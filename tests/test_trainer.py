"""End-to-end training invariants on tiny checkpoints built by the tests (offline)."""

import json
import math

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tiny import make_cfg, quiet, read_metrics, write_pairs

from mlx_dpo import checkpoint
from mlx_dpo.run import run_training


@pytest.fixture
def toy_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    write_pairs(d / "train.jsonl", 16)
    write_pairs(d / "valid.jsonl", 8, seed=1, offset=100)
    return d


def test_step0_loss_is_ln2_and_rewards_zero(tiny_model_path, toy_data, tmp_path):
    run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=1), log=quiet)
    first = read_metrics(tmp_path / "run")[0]
    # policy == reference at step 0 (lora_b = 0), so the sigmoid loss is exactly -log sigmoid(0)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # The reference pass batches pairs differently from the training step, so the summed
    # log-probs (~ -230) agree to float32 round-off (~3e-5), not bit for bit: rewards ~ 1e-6.
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)


def test_quantized_base_trains_and_step0_is_ln2(tiny_model_path, toy_data, tmp_path):
    cfg = make_cfg(
        tiny_model_path, toy_data, tmp_path / "run", iters=3, quantize=4, q_group_size=32
    )
    run_training(cfg, log=quiet)
    rows = read_metrics(tmp_path / "run")
    # the reference comes from the same quantized weights, so step 0 is still exactly ln 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_loss_decreases_and_heldout_accuracy_rises(tiny_model_path, toy_data, tmp_path):
    cfg = make_cfg(
        tiny_model_path,
        toy_data,
        tmp_path / "run",
        iters=24,
        batch_size=4,
        learning_rate=3e-3,
        steps_per_eval=24,
        lr_schedule="constant",
    )
    result = run_training(cfg, log=quiet)
    rows = read_metrics(tmp_path / "run")
    assert np.mean([r["loss"] for r in rows[-4:]]) < math.log(2) - 0.2
    assert result.valid_metrics["rewards/accuracies"] >= 0.9
    assert result.valid_metrics["rewards/margins"] > 0


def _params(model_dir, run_dir=None):
    import mlx_lm

    model, _ = mlx_lm.load(str(model_dir), adapter_path=str(run_dir) if run_dir else None)
    return dict(tree_flatten(model.parameters()))


def test_only_lora_parameters_change(tiny_model_path, toy_data, tmp_path):
    run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=3), log=quiet)
    before = _params(tiny_model_path)
    after = _params(tiny_model_path, tmp_path / "run")
    adapters = {k: v for k, v in after.items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    assert adapters and any(
        np.abs(np.array(v)).max() > 0 for k, v in adapters.items() if k.endswith("lora_b")
    )
    for name, value in after.items():
        if name in adapters:
            continue
        base_name = name.replace(".linear.", ".")
        assert np.array_equal(np.array(value), np.array(before[base_name])), name


def test_grad_accumulation_equivalence(tiny_model_path, toy_data, tmp_path):
    common = dict(iters=2, learning_rate=1e-2, optimizer="sgd", max_grad_norm=0.0)
    run_training(
        make_cfg(tiny_model_path, toy_data, tmp_path / "a", batch_size=4, **common), log=quiet
    )
    run_training(
        make_cfg(
            tiny_model_path,
            toy_data,
            tmp_path / "b",
            batch_size=1,
            grad_accumulation_steps=4,
            **common,
        ),
        log=quiet,
    )
    a = mx.load(str(tmp_path / "a" / "adapters.safetensors"))
    b = mx.load(str(tmp_path / "b" / "adapters.safetensors"))
    assert a.keys() == b.keys()
    moved = 0.0
    for k in a:
        np.testing.assert_allclose(np.array(a[k]), np.array(b[k]), rtol=1e-4, atol=1e-6, err_msg=k)
        moved = max(moved, float(np.abs(np.array(a[k])).max())) if k.endswith("lora_b") else moved
    assert moved > 0  # the updates were not trivially zero


def test_resume_equals_uninterrupted(tiny_model_path, toy_data, tmp_path, monkeypatch):
    common = dict(iters=6, save_every=3, lora_dropout=0.1, seed=3)
    run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "full", **common), log=quiet)

    real_save = checkpoint.save

    def save_then_die(run_dir, step, *args, **kwargs):
        out = real_save(run_dir, step, *args, **kwargs)
        if step == 3:
            raise SystemExit("killed")
        return out

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(SystemExit):
        run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "cut", **common), log=quiet)
    monkeypatch.setattr(checkpoint, "save", real_save)
    run_training(
        make_cfg(tiny_model_path, toy_data, tmp_path / "cut", resume=True, **common), log=quiet
    )
    full = mx.load(str(tmp_path / "full" / "adapters.safetensors"))
    cut = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    for k in full:
        np.testing.assert_allclose(
            np.array(cut[k]), np.array(full[k]), rtol=1e-5, atol=1e-7, err_msg=k
        )
    steps = [r["step"] for r in read_metrics(tmp_path / "cut")]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_existing_run_is_not_overwritten(tiny_model_path, toy_data, tmp_path):
    from mlx_dpo.errors import RunError

    run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=1), log=quiet)
    saved = (tmp_path / "run" / "adapters.safetensors").read_bytes()
    with pytest.raises(RunError, match="already holds a run"):
        run_training(make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=1), log=quiet)
    assert (tmp_path / "run" / "adapters.safetensors").read_bytes() == saved


def test_saved_adapters_load_in_mlx_lm_with_same_logps(tiny_model_path, toy_data, tmp_path):
    import mlx_lm

    from mlx_dpo import reference
    from mlx_dpo.model import load, load_adapter_dir
    from mlx_dpo.run import load_pairs

    cfg = make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=3)
    run_training(cfg, log=quiet)
    ours = load(str(tiny_model_path))
    load_adapter_dir(ours.model, tmp_path / "run")
    pairs, _ = load_pairs(cfg, ours.tokenizer, quiet)
    theirs, _ = mlx_lm.load(str(tiny_model_path), adapter_path=str(tmp_path / "run"))
    a = reference.pair_logps(ours.model, pairs, batch_size=4)
    b = reference.pair_logps(theirs, pairs, batch_size=4)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5)


@pytest.mark.parametrize(
    "options, step0_loss",
    [
        ({"loss_type": ["hinge"]}, 1.0),  # relu(1 - beta*0)
        ({"loss_type": ["ipo"], "beta": 0.1}, 25.0),  # (0 - 1/(2*0.1))^2
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0, 0.5]}, math.log(2) + 0.5),
        ({"loss_type": ["apo_zero"]}, 1.0),  # (1 - sigmoid(0)) + sigmoid(0)
        ({"loss_type": ["sppo_hard"], "beta": 0.5}, 2.0),  # (0 - 1)^2 + (0 + 1)^2
    ],
)
def test_loss_type_takes_effect_in_training(
    tiny_model_path, toy_data, tmp_path, options, step0_loss
):
    # mlx-lm-lora's CLI trained with sigmoid whatever --loss-type said; prove ours does not.
    run_training(
        make_cfg(tiny_model_path, toy_data, tmp_path / "run", iters=1, **options), log=quiet
    )
    # Step-0 log-ratios are 0 to float32 round-off (~1e-5 on summed log-probs: the reference
    # pass pads rows differently); the loss types differ by O(1).
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(step0_loss, abs=1e-4)


def test_reference_cache_is_reused(tiny_model_path, toy_data, tmp_path, monkeypatch):
    from mlx_dpo import reference

    monkeypatch.setenv("MLX_DPO_CACHE", str(tmp_path / "cache"))
    messages = []
    run_training(
        make_cfg(tiny_model_path, toy_data, tmp_path / "a", iters=1, reference_cache=True),
        log=messages.append,
    )
    assert any("reference log-probs (train): computed" in m for m in messages)
    calls = []
    monkeypatch.setattr(reference, "pair_logps", lambda *a, **k: calls.append(1))
    messages.clear()
    run_training(
        make_cfg(tiny_model_path, toy_data, tmp_path / "b", iters=1, reference_cache=True),
        log=messages.append,
    )
    assert any("reference log-probs (train): reused from cache" in m for m in messages)
    assert not calls


@pytest.fixture(scope="module")
def option_runs(tiny_model_path, tmp_path_factory):
    """Second-step losses of short runs, keyed by the options; cached across the parametrization."""
    root = tmp_path_factory.mktemp("options")
    write_pairs(root / "d.jsonl", 24)
    cache = {}

    def second_loss(**options) -> float:
        key = json.dumps(options, sort_keys=True)
        if key not in cache:
            run_dir = root / f"run{len(cache)}"
            run_training(make_cfg(tiny_model_path, root / "d.jsonl", run_dir, **options), log=quiet)
            cache[key] = read_metrics(run_dir)[1]["loss"]
        return cache[key]

    return second_loss


@pytest.mark.parametrize(
    "base, changed",
    [
        ({}, {"beta": 0.5}),
        ({}, {"label_smoothing": 0.2}),
        ({}, {"reference_free": True}),
        ({}, {"f_divergence_type": "js_divergence"}),
        (
            {"f_divergence_type": "alpha_divergence"},
            {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.9},
        ),
        ({"loss_type": ["discopop"]}, {"loss_type": ["discopop"], "discopop_tau": 0.5}),
        ({"loss_type": ["ipo"]}, {"loss_type": ["ipo"], "ipo_length_normalize": False}),
        ({}, {"rpo_alpha": 1.0}),
        ({"loss_type": ["simpo"]}, {"loss_type": ["simpo"], "simpo_gamma": 2.0}),
        (
            {"loss_type": ["sigmoid", "sft"]},
            {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 3.0]},
        ),
    ],
)
def test_each_loss_option_takes_effect(option_runs, base, changed):
    # after one update the policy differs from the reference, so every option must matter
    assert option_runs(**base) != pytest.approx(option_runs(**changed), rel=1e-4)


def test_loss_options_from_yaml_reach_the_trainer(tiny_model_path, tmp_path):
    from mlx_dpo.cli import build_config

    write_pairs(tmp_path / "d.jsonl", 24)
    (tmp_path / "c.yaml").write_text("loss_type: [ipo]\nbeta: 0.1\niters: 1\nsteps_per_report: 1\n")
    flags = {
        "model": str(tiny_model_path),
        "data": str(tmp_path / "d.jsonl"),
        "adapter_path": str(tmp_path / "run"),
    }
    run_training(build_config(str(tmp_path / "c.yaml"), flags), log=quiet)
    assert read_metrics(tmp_path / "run")[0]["loss"] == pytest.approx(25.0, rel=1e-5)
