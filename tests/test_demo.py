"""The bundled demo does what the README says: about half the held-out answers are preferred
before tuning, DPO gets reward accuracy >= 90% and makes the preferred behaviour dominate."""

import pytest

from mlx_dpo import demo
from mlx_dpo.cli import build_config
from mlx_dpo.training import run_training

pytestmark = pytest.mark.slow


def test_demo_run_shows_dpo_working(tmp_path):
    cfg = build_config(None, {"adapter_path": str(tmp_path / "demo")})
    assert cfg.model is None and cfg.data is None  # no --model/--data: the bundled demo
    result = run_training(cfg, log=lambda *_: None)
    s = result.summary
    assert 0.25 <= s["preferred_share_before"] <= 0.75  # the base does both about equally
    assert 0.3 <= s["preference_accuracy_before"] <= 0.7
    assert s["reward_accuracy_after"] >= 0.9
    assert s["preferred_share_after"] >= 0.85
    assert s["preferred_share_after"] >= s["preferred_share_before"] + 0.3

    import mlx_lm  # the adapters load in mlx-lm as they are and change its generations

    model, tokenizer = mlx_lm.load(str(demo.MODEL_DIR), adapter_path=str(tmp_path / "demo"))
    answers = demo.sample_answers(model, tokenizer, ["Add 4 and 8."], temp=0.0)
    assert demo.is_preferred(answers[0], "Add 4 and 8."), answers


def test_is_preferred_rule():
    assert demo.is_preferred("4 plus 8 is 12.", "Add 4 and 8.")
    assert not demo.is_preferred("4 plus 8 is 13.", "Add 4 and 8.")  # wrong
    assert not demo.is_preferred("Sorry, I can not do sums.", "Add 4 and 8.")  # evasive
    assert not demo.is_preferred("2 plus 3 is 5.", "Add 4 and 8.")  # not the question asked
