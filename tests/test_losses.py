"""mlx_dpo.losses against numbers we did not compute with it: the issue's source-text values,
hand-worked cases (torchtune style), and our float64 PyTorch reference (tests/torch_reference.py)
on random inputs and edge cases, for losses, rewards and gradients w.r.t. all four inputs."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_dpo.losses import (
    F_DIVERGENCE_LOSSES,
    LOSSES,
    DPOOutput,
    check_loss_options,
    dpo_loss,
    dpo_metrics,
)

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)


def _np(x: mx.array) -> np.ndarray:
    return np.array(x, dtype=np.float64)


# ---------------------------------------------------------------- (a) values from the issue


def test_issue_example_beta_half():
    out = dpo_loss([-2.0, -1.5], [-3.0, -2.5], [-2.5, -2.0], [-2.5, -2.0], beta=0.5)
    assert round(out.loss.item(), 4) == 0.4741
    np.testing.assert_array_equal(np.round(_np(out.chosen_rewards), 6), [0.25, 0.25])
    np.testing.assert_array_equal(np.round(_np(out.rejected_rewards), 6), [-0.25, -0.25])


POLICY_CHOSEN, POLICY_REJECTED = [-1.0, -0.2, -2.0, -0.5], [-2.0, -1.5, -3.0, -1.0]


@pytest.mark.parametrize(
    "reference, expected",
    [
        (None, 0.64688),
        (([-1.2, -0.5, -2.5, -0.7], [-1.8, -1.3, -2.7, -0.9]), 0.66850),
        (([-3.0, -2.5, -3.5, -2.0], [-1.0, -0.9, -1.1, -0.8]), 0.56557),
    ],
)
def test_issue_examples_beta_tenth(reference, expected):
    out = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, *(reference or ()), beta=0.1)
    assert round(out.loss.item(), 5) == expected
    if reference is None:  # reference-free equals passing reference_free=True with any reference
        other = dpo_loss(POLICY_CHOSEN, POLICY_REJECTED, [9.0] * 4, [-9.0] * 4, reference_free=True)
        assert other.loss.item() == out.loss.item()


# ---------------------------------------------------------------- (b) worked by hand
# Three pairs with beta = 1 and margins d = (pc - pr) - (rc - rr) = [0, ln 3, -ln 3], so that
# sigma(d) = [1/2, 3/4, 1/4] and every loss has a closed form.
HAND = dict(
    policy_chosen_logps=[-2.0, -2.0 + LN3, -2.0],
    policy_rejected_logps=[-2.0, -2.0, -2.0 + LN3],
    reference_chosen_logps=[-1.0, -1.0, -1.0],
    reference_rejected_logps=[-1.0, -1.0, -1.0],
)


def test_sigmoid_by_hand():
    """-log sigma(d) = [ln 2, ln 4/3, ln 4]; dL/dpc_i = -beta sigma(-d_i) / B = -[1/2, 1/4, 3/4] / 3
    and dL/dpr_i = +[1/2, 1/4, 3/4] / 3; rewards = beta (pc - rc) = [-1, -1 + ln 3, -1]."""
    out = dpo_loss(**HAND, beta=1.0)
    np.testing.assert_allclose(_np(out.losses), [LN2, LN4 - LN3, LN4], rtol=1e-6)
    np.testing.assert_allclose(out.loss.item(), (LN2 + 2 * LN4 - LN3) / 3, rtol=1e-6)
    np.testing.assert_allclose(_np(out.chosen_rewards), [-1, -1 + LN3, -1], rtol=1e-6)
    np.testing.assert_allclose(_np(out.rejected_rewards), [-1, -1, -1 + LN3], rtol=1e-6)
    grads = mx.grad(lambda *a: dpo_loss(*a, beta=1.0).loss, argnums=(0, 1, 2, 3))(
        *(mx.array(v) for v in HAND.values())
    )
    weights = np.array([1 / 2, 1 / 4, 3 / 4]) / 3
    for grad, sign in zip(grads, (-1, 1, 1, -1), strict=True):  # references enter with - sign
        np.testing.assert_allclose(_np(grad), sign * weights, rtol=1e-6)


def test_cdpo_by_hand():
    """eps = 1/4: 3/4 (-log sigma(d)) + 1/4 (-log sigma(-d)):
    d = 0: ln 2; d = ln 3: 3/4 ln(4/3) + 1/4 ln 4 = ln 4 - 3/4 ln 3; d = -ln 3: ln 4 - 1/4 ln 3."""
    out = dpo_loss(**HAND, beta=1.0, label_smoothing=0.25)
    np.testing.assert_allclose(
        _np(out.losses), [LN2, LN4 - 0.75 * LN3, LN4 - 0.25 * LN3], rtol=1e-6
    )


def test_robust_by_hand():
    """eps = 1/4: (-(3/4) log sigma(d) + 1/4 log sigma(-d)) / (1/2):
    d = 0: (3/4 - 1/4) ln 2 / (1/2) = ln 2; d = ln 3: (3/4 ln(4/3) - 1/4 ln 4) * 2 = ln 4 - 3/2 ln 3;
    d = -ln 3: (3/4 ln 4 - 1/4 ln(4/3)) * 2 = ln 4 + 1/2 ln 3."""
    out = dpo_loss(**HAND, beta=1.0, loss_type="robust", label_smoothing=0.25)
    np.testing.assert_allclose(_np(out.losses), [LN2, LN4 - 1.5 * LN3, LN4 + 0.5 * LN3], rtol=1e-6)


def test_hinge_by_hand():
    """beta = 1/2, d = [0, 2, 4, -2]: relu(1 - d/2) = [1, 0, 0, 2], mean 3/4."""
    out = dpo_loss([0.0, 2.0, 4.0, -2.0], [0.0] * 4, beta=0.5, loss_type="hinge")
    np.testing.assert_allclose(_np(out.losses), [1, 0, 0, 2], atol=1e-7)
    assert out.loss.item() == 0.75


def test_ipo_by_hand():
    """beta = 1/2, so 1/(2 beta) = 1.
    Summed (paper code): d = [1, 3, 0] -> (d - 1)^2 = [0, 4, 1], mean 5/3.
    Length-normalised (TRL): clr = [2, 8, 1], rlr = [0, 2, 4], |yw| = [2, 4, 1], |yl| = [1, 2, 4]
    -> h = clr/|yw| - rlr/|yl| = [1, 1, 0] -> (h - 1)^2 = [0, 0, 1]."""
    summed = dpo_loss(
        [1.0, 3.0, 0.0], [0.0] * 3, beta=0.5, loss_type="ipo", ipo_length_normalize=False
    )
    np.testing.assert_allclose(_np(summed.losses), [0, 4, 1], atol=1e-6)
    np.testing.assert_allclose(summed.loss.item(), 5 / 3, rtol=1e-6)
    normalised = dpo_loss(
        [2.0, 8.0, 1.0], [0.0, 2.0, 4.0], beta=0.5, loss_type="ipo",
        chosen_lengths=[2, 4, 1], rejected_lengths=[1, 2, 4],
    )  # fmt: skip
    np.testing.assert_allclose(_np(normalised.losses), [0, 0, 1], atol=1e-6)


# ---------------------------------------------------------------- (e) invariants


def test_sigmoid_is_ln2_when_policy_equals_reference():
    policy = np.random.default_rng(0).uniform(-300, -1, size=(2, 8)).astype(np.float32)
    out = dpo_loss(policy[0], policy[1], policy[0], policy[1], beta=0.1)
    assert abs(out.loss.item() - LN2) < 1e-7
    assert not np.any(_np(out.chosen_rewards)) and not np.any(_np(out.rejected_rewards))


def test_rewards_are_detached_and_metrics():
    def first_reward(pc):
        return dpo_loss(pc, mx.array([-1.0, -1.0]), beta=0.1).chosen_rewards.sum()

    assert np.all(_np(mx.grad(first_reward)(mx.array([-1.0, -2.0]))) == 0)
    out = dpo_loss([-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0], beta=0.5)
    metrics = dpo_metrics(out, [-1.0, -2.0, -3.0], [-2.0, -2.0, -1.0])
    expected = {
        "rewards/chosen": -1.0, "rewards/rejected": -5 / 6,
        "rewards/accuracies": 1 / 3,  # rewards 0.5 > -1, tie -1 = -1 is not a win, -1.5 < -0.5
        "rewards/margins": -1 / 6, "logps/chosen": -2.0, "logps/rejected": -5 / 3,
    }  # fmt: skip
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-6), key


def test_output_works_with_value_and_grad_and_compile():
    def loss_fn(pc, pr):
        return dpo_loss(pc, pr, mx.array([-1.0, -1.0]), mx.array([-2.0, -2.0]))

    (out, grad) = mx.value_and_grad(loss_fn)(mx.array([-1.0, -3.0]), mx.array([-2.0, -1.0]))
    assert isinstance(out, DPOOutput) and grad.shape == (2,)
    compiled = mx.compile(lambda pc, pr: tuple(loss_fn(pc, pr)))
    assert compiled(mx.array([-1.0, -3.0]), mx.array([-2.0, -1.0]))[0].item() == out.loss.item()


def test_rpo_alpha_is_sigmoid_plus_weighted_sft():
    args = ([-4.0, -9.0], [-5.0, -8.0], [-4.5, -9.0], [-5.0, -8.5])
    lengths = dict(chosen_lengths=[3, 6], rejected_lengths=[4, 5])
    rpo = dpo_loss(*args, rpo_alpha=0.5, **lengths)
    mpo = dpo_loss(*args, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], **lengths)
    assert rpo.loss.item() == mpo.loss.item()
    sft = dpo_loss(*args, loss_type="sft", **lengths)
    assert sft.loss.item() == pytest.approx(13 / 9, rel=1e-6)  # -(-4 - 9) / (3 + 6)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="dpo"), "valid ones"),
        (dict(loss_type=["sigmoid", "nope"]), "nope"),
        (dict(loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), "loss_weights"),
        (dict(loss_type="exo_pair"), "label_smoothing > 0"),
        (dict(label_smoothing=0.5), "label-flip"),
        (dict(loss_type="hinge", label_smoothing=0.1), "only applies"),
        (dict(beta=0.0), "beta"),
        (dict(loss_type="ipo"), "chosen_lengths"),
        (dict(loss_type="sigmoid_norm"), "chosen_lengths"),
        (dict(loss_type="sft"), "chosen_lengths"),
        (dict(loss_type="simpo"), "chosen_lengths"),
        (dict(loss_type="orpo"), "chosen_lengths"),
        (dict(rpo_alpha=1.0), "chosen_lengths"),
        (dict(loss_type="bco_pair", f_divergence_type="js_divergence"), "bco_pair"),
        (dict(f_divergence_type="kl"), "f_divergence_type"),
        (dict(chosen_lengths=[1, 2, 3], rejected_lengths=[1, 2]), "same B"),
        (dict(use_weighting=True), "chosen_weights"),
        (dict(loss_type="aot", use_weighting=True, chosen_weights=[1, 1]), "aot"),
        (dict(ld_alpha=1.5), "ld_alpha"),
        (dict(ld_alpha=-0.1), "ld_alpha"),
    ],
)
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dpo_loss([-1.0, -2.0], [-2.0, -3.0], [-1.0, -2.0], [-2.0, -3.0], **kwargs)


def test_check_loss_options_without_data():
    """A config can check every dpo_loss keyword before any data exists (others are ignored)."""
    names = check_loss_options(loss_type=["sigmoid"], rpo_alpha=0.5, discopop_tau=0.1, beta=0.2)
    assert names == (["sigmoid", "sft"], [1.0, 0.5])
    with pytest.raises(ValueError, match="valid ones"):
        check_loss_options(loss_type="nope", simpo_gamma=1.0)


def test_reference_free_keeps_rewards_against_the_reference():
    """The DPO paper code: reference_free drops the reference from the loss only; the rewards
    stay beta (policy - reference). Same with cDPO. Without a reference: beta * policy."""
    pc, pr, rc, rr = [-2.0, -4.0], [-3.0, -1.0], [-1.0, -5.0], [-2.5, -2.0]
    for eps in (0.0, 0.2):
        free = dpo_loss(pc, pr, rc, rr, beta=0.5, reference_free=True, label_smoothing=eps)
        np.testing.assert_allclose(_np(free.chosen_rewards), [-0.5, 0.5], rtol=1e-6)
        np.testing.assert_allclose(_np(free.rejected_rewards), [-0.25, 0.5], rtol=1e-6)
        # the loss is that of no reference at all: d = pc - pr = [1, -3]
        none = dpo_loss(pc, pr, beta=0.5, label_smoothing=eps)
        assert free.loss.item() == none.loss.item()
        z = np.array([0.5, -1.5])
        expected = -(1 - eps) * -np.logaddexp(0, -z) - eps * -np.logaddexp(0, z)
        assert none.loss.item() == pytest.approx(expected.mean(), rel=1e-6)
    np.testing.assert_allclose(_np(none.chosen_rewards), [-1.0, -2.0], rtol=1e-6)
    np.testing.assert_allclose(_np(none.rejected_rewards), [-1.5, -0.5], rtol=1e-6)


def test_wpo_weights_multiply_each_pair_and_are_detached():
    """WPO by hand: losses[i] = W_i * ln 2 at d = 0, W = chosen_weights * rejected_weights, and
    the weights get no gradient."""
    same = [-3.0, -5.0, -7.0]
    w_c, w_r = mx.array([0.5, 1.0, 0.1]), mx.array([0.2, 1.0, 3.0])
    out = dpo_loss(same, same, same, same, use_weighting=True, chosen_weights=w_c,
                   rejected_weights=w_r)  # fmt: skip
    np.testing.assert_allclose(_np(out.losses), np.array([0.1, 1.0, 0.3]) * LN2, rtol=1e-6)
    grad = mx.grad(
        lambda w: (
            dpo_loss(
                same, [-4.0] * 3, use_weighting=True, chosen_weights=w, rejected_weights=w_r
            ).loss
        )  # fmt: skip
    )(w_c)
    assert not np.any(_np(grad))
    unweighted = dpo_loss(same, same, same, same, chosen_weights=w_c, rejected_weights=w_r)
    assert unweighted.loss.item() == pytest.approx(LN2, rel=1e-7)  # weights unused without it


def test_ld_alpha_sft_reads_the_plain_sums():
    args = ([-4.0, -9.0], [-5.0, -8.0], [-4.5, -9.0], [-5.0, -8.5])
    lengths = dict(chosen_lengths=[3, 6], rejected_lengths=[4, 5])
    sft = dpo_loss(*args, loss_type="sft", ld_alpha=0.5, sft_chosen_logps=[-6.0, -12.0], **lengths)
    assert sft.loss.item() == pytest.approx(18 / 9, rel=1e-6)  # -(-6 - 12) / (3 + 6)


def test_low_precision_logps_are_refused():
    """A margin of bf16 sums is noise: -301.0 and -300.0 round to the same bf16 value."""
    assert mx.array(-301.0, mx.bfloat16).item() == mx.array(-300.0, mx.bfloat16).item()
    for dtype in (mx.bfloat16, mx.float16):
        with pytest.raises(ValueError, match="float32"):
            dpo_loss(mx.array([-301.0], dtype), mx.array([-300.0], dtype))


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="both"):
        dpo_loss([-1.0], [-2.0], [-1.0])
    with pytest.raises(ValueError, match="same B"):
        dpo_loss([-1.0, -2.0], [-2.0])
    with pytest.raises(ValueError, match=r"\(B,\)"):
        dpo_loss([[-1.0]], [[-2.0]])


# ---------------------------------------------------------------- (c) vs the torch reference


def _case(seed, batch, low, high, beta, margin=0.0):
    rng = np.random.default_rng(seed)
    pc, pr, rc, rr = rng.uniform(low, high, size=(4, batch)).astype(np.float32)
    pc, pr = pc + margin, pr - margin  # margin > 0: the policy strongly prefers chosen
    lengths = rng.integers(1, 40, size=(2, batch)).astype(np.float32)
    return dict(logps=(pc, pr, rc, rr), lengths=lengths, beta=beta)


def _equal_case():
    same = np.random.default_rng(7).uniform(-40, -1, size=5).astype(np.float32)
    return dict(logps=(same, same, same, same), lengths=np.full((2, 5), 7.0, np.float32), beta=0.1)


def _huge_margin_case():
    pc = np.array([-1.0, -400.0, -2.0, -350.0], np.float32)
    pr = np.array([-400.0, -1.0, -300.0, -3.0], np.float32)
    ref = np.array([-50.0, -60.0, -55.0, -65.0], np.float32)
    return dict(
        logps=(pc, pr, ref, ref[::-1].copy()),
        lengths=np.array([[50, 80, 60, 70]] * 2, np.float32),
        beta=0.5,
    )


CASES = {
    "random": _case(0, 8, -60.0, -1.0, 0.1),
    "batch1": _case(1, 1, -30.0, -1.0, 0.1),
    "equal": _equal_case(),
    "near_minus_500": _case(2, 6, -505.0, -495.0, 0.1),
    "beta_0.001": _case(3, 6, -60.0, -1.0, 0.001),
    "beta_10": _case(4, 6, -60.0, -1.0, 10.0),
    "huge_margin": _huge_margin_case(),
}

CONFIGS = [dict(loss_type=name) for name in LOSSES if name != "exo_pair"] + [
    dict(loss_type="sigmoid", label_smoothing=0.2),  # cDPO
    dict(loss_type="robust", label_smoothing=0.1),
    dict(loss_type="robust", label_smoothing=0.3),
    dict(loss_type="exo_pair", label_smoothing=1e-3),
    dict(loss_type="exo_pair", label_smoothing=0.2),
    dict(loss_type="aot", label_smoothing=0.1),
    dict(loss_type="aot_unpaired", label_smoothing=0.1),
    dict(loss_type="simpo", simpo_gamma=1.0, label_smoothing=0.1),
    dict(loss_type="ipo", ipo_length_normalize=False),
    dict(loss_type="discopop", discopop_tau=0.5),
    dict(loss_type="sigmoid", reference_free=True),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7]),
    dict(loss_type="sigmoid", rpo_alpha=0.3),
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
    dict(loss_type=["hinge", "apo_zero"]),
    dict(loss_type="sigmoid", use_weighting=True),  # WPO
    dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.5], use_weighting=True),
    dict(loss_type="sigmoid", reference_free=True, label_smoothing=0.2),  # cDPO, no reference
    dict(loss_type=["sigmoid", "sft"], ld_alpha=0.5),  # LD-DPO: sft reads the plain sums
    dict(loss_type="sigmoid", rpo_alpha=0.3, ld_alpha=0.0, use_weighting=True),
]
for _f in ("forward_kl", "js_divergence", "alpha_divergence"):
    for _name in F_DIVERGENCE_LOSSES:
        _eps = 1e-3 if _name == "exo_pair" else 0.0
        CONFIGS.append(dict(loss_type=_name, f_divergence_type=_f, label_smoothing=_eps))
CONFIGS += [
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
]


def _config_id(config):
    return "-".join(f"{v}" if k == "loss_type" else f"{k}={v}" for k, v in config.items())


def _extras(case, config) -> dict:
    """WPO weights and LD-DPO's plain chosen sums, when the config reads them."""
    n = len(case["logps"][0])
    rng = np.random.default_rng(n)
    extras = {}
    if config.get("use_weighting"):
        extras["chosen_weights"], extras["rejected_weights"] = rng.uniform(0.05, 1.5, (2, n))
    if config.get("ld_alpha") is not None:
        extras["sft_chosen_logps"] = case["logps"][0] - rng.uniform(0.0, 5.0, n)
    return {k: v.astype(np.float32) for k, v in extras.items()}


def _mlx_side(case, config):
    pc, pr, rc, rr = (mx.array(v) for v in case["logps"])
    kwargs = dict(config, beta=case["beta"], chosen_lengths=case["lengths"][0],
                  rejected_lengths=case["lengths"][1], **_extras(case, config))  # fmt: skip
    out = dpo_loss(pc, pr, rc, rr, **kwargs)
    grads = mx.grad(lambda *a: dpo_loss(*a, **kwargs).loss, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    return out, grads


def _torch_side(case, config):
    import torch
    from torch_reference import dpo_loss as reference_loss

    logps = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in case["logps"]]
    lengths = [torch.tensor(v, dtype=torch.float64) for v in case["lengths"]]
    extras = {k: torch.tensor(v, dtype=torch.float64) for k, v in _extras(case, config).items()}
    loss, losses, chosen_rewards, rejected_rewards = reference_loss(
        *logps, **config, beta=case["beta"], chosen_lengths=lengths[0],
        rejected_lengths=lengths[1], **extras,
    )  # fmt: skip
    grads = torch.autograd.grad(loss, logps, allow_unused=True)
    grads = [
        np.zeros(len(g_in)) if g is None else g.numpy()
        for g, g_in in zip(grads, logps, strict=True)
    ]
    return (
        loss.item(),
        losses.detach().numpy(),
        chosen_rewards.numpy(),
        rejected_rewards.numpy(),
        grads,
    )


def _assert_close(actual, expected, what, rtol=1e-5, atol=1e-5):
    # float32 vs float64: rounding gives ~1e-6 relative error, plus absolute error where a
    # value is a difference of larger numbers (ipo, hinge near 0).
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


FLOAT32_MAX = float(np.finfo(np.float32).max)


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_torch_reference(case_name, config):
    pytest.importorskip("torch")
    case = CASES[case_name]
    if config.get("f_divergence_type") == "forward_kl" and case_name == "huge_margin":
        # TRL's forward_kl has no clamp; e^400 is beyond float32 and ours clamps at e^80.
        pytest.skip("forward_kl scores of +-400 log-ratios do not fit in float32")
    out, grads = _mlx_side(case, config)
    loss, losses, chosen_rewards, rejected_rewards, ref_grads = _torch_side(case, config)
    _assert_close(_np(out.chosen_rewards), chosen_rewards, "chosen_rewards")
    _assert_close(_np(out.rejected_rewards), rejected_rewards, "rejected_rewards")
    # Compare where the float64 value exists and fits in float32. The naive reference formulas
    # overflow where ours do not (discopop's e^-z * m is inf * 0 for very negative z), and some
    # f-divergence values (e^59 squared by ipo) are beyond float32 whatever the code.
    fits = np.isfinite(losses) & (np.abs(losses) < FLOAT32_MAX / len(losses))
    for ref_grad in ref_grads:
        fits &= np.isfinite(ref_grad) & (np.abs(ref_grad) < FLOAT32_MAX / len(losses))
    if not fits.any():
        pytest.skip("no value of this case fits in float32")
    assert np.all(np.isfinite(_np(out.losses)[fits]))
    _assert_close(_np(out.losses)[fits], losses[fits], "losses")
    if fits.all():
        _assert_close(out.loss.item(), loss, "loss")
    for name, grad, ref_grad in zip(("pc", "pr", "rc", "rr"), grads, ref_grads, strict=True):
        _assert_close(_np(grad)[fits], ref_grad[fits], f"d loss / d {name}")


# ---------------------------------------------------------------- (d) finite in float32


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_no_nan_or_inf_at_extremes(config):
    """Log-probs of -1e4, margins of +-1e4 and beta 10: every loss, reward and gradient whose
    math is finite stays finite in float32 (exponents are clamped or taken in log space)."""
    pc = mx.array([-1.0, -1e4, -5e3, -0.5, -300.0])
    pr = mx.array([-1e4, -1.0, -5e3, -0.5, -1e-6])
    rc = mx.array([-5e3, -1.0, -1e4, -0.5, -2.0])
    rr = mx.array([-1.0, -1e4, -1.0, -0.5, -1e4])
    exponential_scores = config.get("f_divergence_type") in ("forward_kl", "alpha_divergence")
    if config["loss_type"] == "ipo" and exponential_scores:
        pytest.skip("ipo squares scores up to e^80: beyond float32 whatever the code")
    lengths = dict(chosen_lengths=[1, 3, 0, 1, 100], rejected_lengths=[1, 3, 0, 1, 2])
    extras = {}
    if config.get("use_weighting"):
        extras = dict(chosen_weights=[1e-30, 1.0, 2.0, 0.5, 1e3], rejected_weights=[1.0] * 5)
    if config.get("ld_alpha") is not None:
        extras["sft_chosen_logps"] = [-1e4, -1.0, -0.5, -300.0, -2.0]
    kwargs = dict(config, beta=10.0, **lengths, **extras)
    out = dpo_loss(pc, pr, rc, rr, **kwargs)
    grads = mx.grad(lambda *a: dpo_loss(*a, **kwargs).loss, argnums=(0, 1, 2, 3))(pc, pr, rc, rr)
    for value in (out.loss, out.losses, out.chosen_rewards, out.rejected_rewards, *grads):
        assert np.all(np.isfinite(_np(value))), value


def test_wpo_and_ld_dpo_config_keys(tmp_path):
    """YAML keys and flags come from TrainConfig's fields; a bad ld_alpha names the field."""
    from mlx_dpo.config import LOSS_FIELDS, ConfigError, TrainConfig

    (tmp_path / "c.yaml").write_text("use-weighting: true\nld_alpha: 0.25\n")
    cfg = TrainConfig.from_yaml(tmp_path / "c.yaml")
    assert (cfg.use_weighting, cfg.ld_alpha) == (True, 0.25)
    assert {"use_weighting", "ld_alpha"} <= set(LOSS_FIELDS)
    assert cfg.loss_kwargs()["ld_alpha"] == 0.25
    with pytest.raises(ConfigError, match="ld_alpha"):
        TrainConfig(ld_alpha=1.5)
    with pytest.raises(ConfigError, match="aot"):
        TrainConfig(loss_type=["aot"], use_weighting=True)
