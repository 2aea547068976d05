"""The DPO loss family: pure functions of per-sequence log-probs (no model, tokenizer or config).

Inputs per pair i: policy and reference log-probs of the chosen and rejected completions, each
*summed* over completion tokens (``mlx_dpo.logps``). With the log-ratios ``clr = pc - rc`` and
``rlr = pr - rr`` and ``d = f(clr) - f(rlr)`` (f = identity unless ``f_divergence_type`` says
otherwise), each entry of ``LOSSES`` maps a ``PairLogps`` to per-example losses (B,). Semantics
and keyword names follow TRL 1.16 (formulas with their papers: docs/losses.md), except where a
docstring says otherwise:

* ``label_smoothing`` on ``sigmoid`` is conservative DPO (cDPO, the DPO paper code); TRL 1.16
  silently ignores it there.
* ``reference_free=True`` sets the reference log-ratio to 0 in the loss only; the rewards stay
  ``beta * (policy - reference)`` when reference log-probs are given (the DPO paper code: they
  measure drift from the reference), and are ``beta * policy_logps`` when none are given.
* ``use_weighting`` (WPO, Zhou et al. 2024) multiplies each example's loss by the detached
  weight ``chosen_weights * rejected_weights`` that the log-prob head computes; ``ld_alpha``
  (LD-DPO, Liu et al. 2024) is applied by the head too (``mlx_dpo.logps.forward_pair_logps``):
  the log-probs passed in are then LD-DPO's sums, and ``sft`` reads ``sft_chosen_logps``.
* ``rpo_alpha`` adds ``sft`` with weight alpha (RPO; TRL 1.16 spells it ``["sigmoid", "sft"]``).
* Extra loss types not in TRL's DPOTrainer: ``simpo`` (Meng et al. 2024) and ``orpo`` (Hong et
  al. 2024); ``ipo_length_normalize=False`` gives the IPO paper code's summed form.

All math is float32 in stable forms (bf16/fp16 log-probs are refused: a difference of two sums
of hundreds of token log-probs keeps no correct digit in bf16): log_sigmoid, sigmoid(-x) instead of 1 - sigmoid(x), exp
exponents clamped at 80 (float32 overflows at 88.7) or folded into log space.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, NamedTuple

import mlx.core as mx

# The option rules live in an MLX-free module so that a config is checked before MLX loads.
from mlx_dpo.loss_options import (  # noqa: F401 (re-exported)
    F_DIVERGENCE_LOSSES,
    LABEL_SMOOTHING_LOSSES,
    check_loss_options,
)
from mlx_dpo.loss_types import LOSSES, PairLogps  # noqa: F401 (re-exported)


class DPOOutput(NamedTuple):
    """``loss`` () is the value to differentiate (first, so ``mx.value_and_grad`` takes it);
    ``losses``, ``chosen_rewards``, ``rejected_rewards`` are (B,), the rewards detached."""

    loss: mx.array
    losses: mx.array
    chosen_rewards: mx.array
    rejected_rewards: mx.array


def _vector(x: Any, name: str) -> mx.array:
    x = x if isinstance(x, mx.array) else mx.array(x)
    if x.dtype in (mx.bfloat16, mx.float16):
        # bf16 has 8 significant bits: a sum near -300 is off by up to ~1, larger than the
        # margins DPO works with. The log-prob head returns float32; keep it.
        raise ValueError(f"{name} must be float32 log-probs, got {x.dtype}")
    x = x.astype(mx.float32)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a (B,) vector, got shape {tuple(x.shape)}")
    return x


def dpo_loss(
    policy_chosen_logps: Any,
    policy_rejected_logps: Any,
    reference_chosen_logps: Any = None,
    reference_rejected_logps: Any = None,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: Any = None,
    rejected_lengths: Any = None,
    ipo_length_normalize: bool = True,
    rpo_alpha: float | None = None,
    simpo_gamma: float = 0.5,
    use_weighting: bool = False,
    chosen_weights: Any = None,
    rejected_weights: Any = None,
    ld_alpha: float | None = None,
    sft_chosen_logps: Any = None,
) -> DPOOutput:
    """Preference loss of a batch of pairs from (B,) float32 summed log-probs.

    Reference log-probs: both or neither (neither, or ``reference_free``: a log-ratio of 0).
    ``loss_type``: a name in ``LOSSES`` or a list, weighted by ``loss_weights`` and summed.
    ``*_lengths``: completion token counts (length-normalised losses); ``*_weights``: WPO's
    sequence weights; ``sft_chosen_logps``: the plain sums ``sft`` reads under LD-DPO. Every
    option, the losses it applies to and where it differs from TRL: docs/losses.md.

    Returns DPOOutput(loss, losses, chosen_rewards, rejected_rewards); the rewards are
    β·(policy - reference), detached, also with ``reference_free`` (β·policy with no reference).
    """
    names, weights = check_loss_options(
        loss_type, loss_weights, beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, rpo_alpha=rpo_alpha,
        use_weighting=use_weighting, ld_alpha=ld_alpha,
    )  # fmt: skip
    v = _loss_inputs(
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps, chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths, chosen_weights=chosen_weights,
        rejected_weights=rejected_weights, sft_chosen_logps=sft_chosen_logps,
    )  # fmt: skip
    if use_weighting and (v["chosen_weights"] is None or v["rejected_weights"] is None):
        raise ValueError("use_weighting needs chosen_weights and rejected_weights (WPO weights)")
    zeros = mx.zeros_like(v["policy_chosen"])
    pairs = PairLogps(
        v["policy_chosen"], v["policy_rejected"],
        zeros if reference_free else v["reference_chosen"],
        zeros if reference_free else v["reference_rejected"],
        v["chosen_lengths"], v["rejected_lengths"], beta=beta, label_smoothing=label_smoothing,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, ipo_length_normalize=ipo_length_normalize,
        simpo_gamma=simpo_gamma,
    )  # fmt: skip
    losses = _weighted_sum(names, weights, pairs, v["sft_chosen_logps"])
    if use_weighting:  # WPO (Zhou et al. 2024, Eq. 2): a detached per-pair weight
        losses = losses * mx.stop_gradient(v["chosen_weights"] * v["rejected_weights"])
    # The implicit reward r = β log π/π_ref (DPO §5), never differentiated; reference_free
    # changes the loss only (the paper code keeps the rewards as a measure of drift).
    chosen_rewards = mx.stop_gradient(beta * (v["policy_chosen"] - v["reference_chosen"]))
    rejected_rewards = mx.stop_gradient(beta * (v["policy_rejected"] - v["reference_rejected"]))
    return DPOOutput(losses.mean(), losses, chosen_rewards, rejected_rewards)


def _weighted_sum(names, weights, pairs: PairLogps, sft_chosen_logps) -> mx.array:
    """Per example Σ_k w_k · l_k over the loss types (MPO style)."""
    sft_pairs = pairs
    if sft_chosen_logps is not None:  # LD-DPO: the NLL term reads the plain sums
        sft_pairs = replace(pairs, policy_chosen_logps=sft_chosen_logps)
    per_type = [
        w * LOSSES[name](sft_pairs if name == "sft" else pairs)
        for name, w in zip(names, weights, strict=True)
    ]
    return sum(per_type[1:], per_type[0])


def _loss_inputs(
    policy_chosen, policy_rejected, reference_chosen, reference_rejected, **optional
) -> dict[str, mx.array | None]:
    """dpo_loss's array inputs as float32 (B,) vectors, checked to agree on B; the reference
    log-probs are zeros when neither is given, an optional input that is not given None."""
    if (reference_chosen is None) != (reference_rejected is None):
        raise ValueError("pass both reference_chosen_logps and reference_rejected_logps, or none")
    out = {
        "policy_chosen": _vector(policy_chosen, "policy_chosen_logps"),
        "policy_rejected": _vector(policy_rejected, "policy_rejected_logps"),
    }
    if reference_chosen is None:
        out["reference_chosen"] = out["reference_rejected"] = mx.zeros_like(out["policy_chosen"])
    else:
        out["reference_chosen"] = _vector(reference_chosen, "reference_chosen_logps")
        out["reference_rejected"] = _vector(reference_rejected, "reference_rejected_logps")
    out.update({k: None if x is None else _vector(x, k) for k, x in optional.items()})
    shapes = {tuple(a.shape) for a in out.values() if a is not None}
    if len(shapes) != 1:
        raise ValueError(f"all inputs must be (B,) with the same B, got shapes {sorted(shapes)}")
    return out


def pair_extras(forward: Any, b: int) -> dict[str, Any]:
    """dpo_loss's WPO weights and LD-DPO's plain chosen sums from a ``logps.PairForward`` of
    B = ``b`` pairs (rows 0..b-1 chosen, b..2b-1 rejected)."""
    extras: dict[str, Any] = {"sft_chosen_logps": forward.plain_logps[:b]}
    if forward.weights is not None:
        extras["chosen_weights"] = forward.weights[:b]
        extras["rejected_weights"] = forward.weights[b:]
    return extras


# The metrics every report carries, in print order (dpo_metrics' keys plus the loss).
METRIC_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def dpo_metrics(
    output: DPOOutput, policy_chosen_logps: Any, policy_rejected_logps: Any
) -> dict[str, mx.array]:
    """Batch means with DPO's standard names; accuracy is per example (strict >), then averaged."""
    chosen, rejected = output.chosen_rewards, output.rejected_rewards
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).astype(mx.float32).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": _vector(policy_chosen_logps, "policy_chosen_logps").mean(),
        "logps/rejected": _vector(policy_rejected_logps, "policy_rejected_logps").mean(),
    }
