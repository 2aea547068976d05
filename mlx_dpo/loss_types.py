"""The loss types of the DPO family, one function each, and the registry `LOSSES`.

Each maps a `PairLogps` (the four (B,) log-prob vectors, optional lengths and the options) to
per-example losses (B,); `mlx_dpo.losses.dpo_loss` builds the `PairLogps`, sums the chosen
types with their weights and adds the rewards. Formulas with their papers: docs/losses.md.
All math is float32 in stable forms: log_sigmoid, sigmoid(-x) instead of 1 - sigmoid(x), exp
exponents clamped at `EXP_CLAMP` (float32 overflows at 88.7) or folded into log space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

EXP_CLAMP = 80.0  # largest exponent passed to exp: e^80 ~ 5.5e34 < float32 max ~ 3.4e38


@dataclass(frozen=True)
class PairLogps:
    """Everything a loss may read: (B,) float32 log-probs, optional (B,) lengths, options."""

    policy_chosen_logps: mx.array
    policy_rejected_logps: mx.array
    reference_chosen_logps: mx.array
    reference_rejected_logps: mx.array
    chosen_lengths: mx.array | None = None
    rejected_lengths: mx.array | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    ipo_length_normalize: bool = True
    simpo_gamma: float = 0.5

    @property
    def chosen_logratios(self) -> mx.array:
        return self.policy_chosen_logps - self.reference_chosen_logps

    @property
    def rejected_logratios(self) -> mx.array:
        return self.policy_rejected_logps - self.reference_rejected_logps

    def scores(self) -> tuple[mx.array, mx.array]:
        """f-divergence scores f(clr), f(rlr) (TRL 1.16 ``_compute_loss``)."""
        f, alpha = F_DIVERGENCES[self.f_divergence_type], self.f_alpha_divergence_coef
        return f(self.chosen_logratios, alpha), f(self.rejected_logratios, alpha)

    def margin(self) -> mx.array:
        """d = f(clr) - f(rlr): how much more the policy moved towards the chosen completion."""
        cs, rs = self.scores()
        return cs - rs

    def lengths(self, loss_type: str) -> tuple[mx.array, mx.array]:
        """Completion token counts, at least 1 (an empty completion must not divide by 0)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"loss_type {loss_type!r} divides by completion lengths: pass chosen_lengths "
                "and rejected_lengths (completion token counts per pair)"
            )
        return mx.maximum(self.chosen_lengths, 1.0), mx.maximum(self.rejected_lengths, 1.0)


def _alpha_divergence(u: mx.array, alpha: float) -> mx.array:
    if alpha == 1.0:  # the limit a -> 1 is reverse KL
        return u
    return (mx.exp(mx.minimum((alpha - 1.0) * u, EXP_CLAMP)) - 1.0) / (alpha - 1.0)


# f-divergence scores f(u) of a log-ratio u (Wang et al. 2023 via TRL 1.16): reverse_kl u;
# forward_kl 1 - e^-u; js_divergence log 2 + log σ(u); alpha_divergence (e^((a-1)u) - 1)/(a-1).
# Not mx.expm1: its gradient, expm1(x) + 1, rounds to 0 for x < -17 in float32 (MLX 0.32).
F_DIVERGENCES: dict[str, Callable[[mx.array, float], mx.array]] = {
    "reverse_kl": lambda u, alpha: u,
    "forward_kl": lambda u, alpha: 1.0 - mx.exp(mx.minimum(-u, EXP_CLAMP)),
    "js_divergence": lambda u, alpha: math.log(2.0) + nn.log_sigmoid(u),
    "alpha_divergence": _alpha_divergence,
}


def _smoothed_sigmoid(z: mx.array, eps: float) -> mx.array:
    # cDPO (Mitchell 2023, Eq. 3): the label is flipped with probability eps; eps = 0 is DPO.
    return -(1.0 - eps) * nn.log_sigmoid(z) - eps * nn.log_sigmoid(-z)


def sigmoid_loss(x: PairLogps) -> mx.array:
    """DPO (Rafailov et al. 2023, Eq. 7): -log σ(β d); with label_smoothing ε, cDPO
    -(1-ε) log σ(β d) - ε log σ(-β d) (the paper code; TRL 1.16 ignores ε here)."""
    return _smoothed_sigmoid(x.beta * x.margin(), x.label_smoothing)


def hinge_loss(x: PairLogps) -> mx.array:
    """SLiC (Zhao et al. 2023): relu(1 - β d)."""
    return nn.relu(1.0 - x.beta * x.margin())


def ipo_loss(x: PairLogps) -> mx.array:
    """IPO (Azar et al. 2023, Eq. 17, τ = β): (h - 1/(2β))².

    TRL: h = f(clr)/|yw| - f(rlr)/|yl| (length-normalised, needs the lengths). With
    ``ipo_length_normalize=False``, h = d on summed log-probs, as in the DPO paper code."""
    cs, rs = x.scores()
    if x.ipo_length_normalize:
        chosen_lengths, rejected_lengths = x.lengths("ipo")
        cs, rs = cs / chosen_lengths, rs / rejected_lengths
    return (cs - rs - 1.0 / (2.0 * x.beta)) ** 2


def exo_pair_loss(x: PairLogps) -> mx.array:
    """EXO (Ji et al. 2024), pairwise: KL(p_θ || p_ε) between σ(±β d) and (1-ε, ε); ε > 0."""
    z, eps = x.beta * x.margin(), x.label_smoothing
    return mx.sigmoid(z) * (nn.log_sigmoid(z) - math.log1p(-eps)) + mx.sigmoid(-z) * (
        nn.log_sigmoid(-z) - math.log(eps)
    )


def nca_pair_loss(x: PairLogps) -> mx.array:
    """NCA (Chen et al. 2024): -log σ(β clr) - ½ log σ(-β clr) - ½ log σ(-β rlr)."""
    zc, zr = x.beta * x.chosen_logratios, x.beta * x.rejected_logratios
    return -nn.log_sigmoid(zc) - 0.5 * nn.log_sigmoid(-zc) - 0.5 * nn.log_sigmoid(-zr)


def robust_loss(x: PairLogps) -> mx.array:
    """Robust DPO (Chowdhury et al. 2024): (-(1-ε) log σ(β d) + ε log σ(-β d)) / (1 - 2ε)."""
    z, eps = x.beta * x.margin(), x.label_smoothing
    return (-(1.0 - eps) * nn.log_sigmoid(z) + eps * nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)


def bco_pair_loss(x: PairLogps) -> mx.array:
    """BCO (Jung et al. 2024), pairwise, without TRL ≤ 0.28's running-mean shift δ:
    -log σ(β clr) - log σ(-β rlr)."""
    return -nn.log_sigmoid(x.beta * x.chosen_logratios) - nn.log_sigmoid(
        -x.beta * x.rejected_logratios
    )


def sppo_hard_loss(x: PairLogps) -> mx.array:
    """SPPO (Wu et al. 2024), hard labels: (clr - 1/(2β))² + (rlr + 1/(2β))²."""
    half = 1.0 / (2.0 * x.beta)
    return (x.chosen_logratios - half) ** 2 + (x.rejected_logratios + half) ** 2


def _aot(x: PairLogps, chosen: mx.array, rejected: mx.array) -> mx.array:
    # AOT (Melnyk et al. 2024): sorting over the batch matches the quantiles of the two
    # distributions; the per-example losses come out in sorted order.
    delta = mx.sort(chosen) - mx.sort(rejected)
    return _smoothed_sigmoid(x.beta * delta, x.label_smoothing)


def aot_loss(x: PairLogps) -> mx.array:
    """AOT, paired: Δ = sort(pc - pr) - sort(rc - rr); -(1-ε) log σ(βΔ) - ε log σ(-βΔ)."""
    return _aot(
        x,
        x.policy_chosen_logps - x.policy_rejected_logps,
        x.reference_chosen_logps - x.reference_rejected_logps,
    )


def aot_unpaired_loss(x: PairLogps) -> mx.array:
    """AOT, unpaired: Δ = sort(clr) - sort(rlr); -(1-ε) log σ(βΔ) - ε log σ(-βΔ)."""
    return _aot(x, x.chosen_logratios, x.rejected_logratios)


def apo_zero_loss(x: PairLogps) -> mx.array:
    """APO-zero (D'Oosterlinck et al. 2024): (1 - σ(β clr)) + σ(β rlr), as σ(-β clr) + σ(β rlr)."""
    return mx.sigmoid(-x.beta * x.chosen_logratios) + mx.sigmoid(x.beta * x.rejected_logratios)


def apo_down_loss(x: PairLogps) -> mx.array:
    """APO-down: σ(β clr) + (1 - σ(β (clr - rlr))), the latter as σ(-β (clr - rlr))."""
    clr, rlr = x.chosen_logratios, x.rejected_logratios
    return mx.sigmoid(x.beta * clr) + mx.sigmoid(-x.beta * (clr - rlr))


def discopop_loss(x: PairLogps) -> mx.array:
    """DiscoPOP (Chris Lu et al. 2024), log-ratio modulated: z = β d, m = σ(z/τ),
    -log σ(z) (1 - m) + e^-z m. e^-z m is computed as exp(log σ(z/τ) - z), finite wherever the
    loss is (TRL's e^-z overflows for z < -88 and gives inf·0 = NaN)."""
    z, tau = x.beta * x.margin(), x.discopop_tau
    exp_term = mx.exp(mx.minimum(nn.log_sigmoid(z / tau) - z, EXP_CLAMP))
    return -nn.log_sigmoid(z) * mx.sigmoid(-z / tau) + exp_term


def sft_loss(x: PairLogps) -> mx.array:
    """NLL of the chosen completions, averaged over all chosen tokens of the batch (TRL 1.16):
    -Σ_i pc_i / Σ_i |yw_i|. Spread as l_i = -pc_i · B / Σ|yw| so that mean_i l_i is that value."""
    chosen_lengths, _ = x.lengths("sft")
    batch = x.policy_chosen_logps.shape[0]
    return -x.policy_chosen_logps * (batch / mx.maximum(chosen_lengths.sum(), 1.0))


def sigmoid_norm_loss(x: PairLogps) -> mx.array:
    """Length-normalised DPO (Tülu 3 style): -log σ(β (f(clr)/|yw| - f(rlr)/|yl|))."""
    cs, rs = x.scores()
    chosen_lengths, rejected_lengths = x.lengths("sigmoid_norm")
    return -nn.log_sigmoid(x.beta * (cs / chosen_lengths - rs / rejected_lengths))


def simpo_loss(x: PairLogps) -> mx.array:
    """SimPO (Meng et al. 2024): -log σ(β pc/|yw| - β pr/|yl| - γ), γ = ``simpo_gamma``;
    reference-free. label_smoothing ε smooths it like cDPO (as TRL's CPOTrainer does)."""
    chosen_lengths, rejected_lengths = x.lengths("simpo")
    margin = x.policy_chosen_logps / chosen_lengths - x.policy_rejected_logps / rejected_lengths
    return _smoothed_sigmoid(x.beta * margin - x.simpo_gamma, x.label_smoothing)


def _log1mexp(a: mx.array) -> mx.array:
    # log(1 - e^a) for a < 0 (Mächler 2012): expm1 near 0, log1p further out.
    return mx.where(a > -math.log(2.0), mx.log(-mx.expm1(a)), mx.log1p(-mx.exp(a)))


def orpo_loss(x: PairLogps) -> mx.array:
    """ORPO (Hong et al. 2024): -p̄w - λ log σ(log odds(yw) - log odds(yl)), λ = ``beta``.

    p̄ = mean token log-prob (logps / length), log odds = p̄ - log(1 - e^p̄) (stable log1mexp).
    The NLL term is per example (the paper's L_SFT); TRL's ORPOTrainer averages it over all
    chosen tokens of the batch instead. Reference-free."""
    chosen_lengths, rejected_lengths = x.lengths("orpo")
    mean_chosen = x.policy_chosen_logps / chosen_lengths
    mean_rejected = x.policy_rejected_logps / rejected_lengths
    log_odds = (mean_chosen - _log1mexp(mean_chosen)) - (mean_rejected - _log1mexp(mean_rejected))
    return -mean_chosen - x.beta * nn.log_sigmoid(log_odds)


LOSSES: dict[str, Callable[[PairLogps], mx.array]] = {
    "sigmoid": sigmoid_loss,
    "hinge": hinge_loss,
    "ipo": ipo_loss,
    "exo_pair": exo_pair_loss,
    "nca_pair": nca_pair_loss,
    "robust": robust_loss,
    "bco_pair": bco_pair_loss,
    "sppo_hard": sppo_hard_loss,
    "aot": aot_loss,
    "aot_unpaired": aot_unpaired_loss,
    "apo_zero": apo_zero_loss,
    "apo_down": apo_down_loss,
    "discopop": discopop_loss,
    "sft": sft_loss,
    "sigmoid_norm": sigmoid_norm_loss,
    "simpo": simpo_loss,
    "orpo": orpo_loss,
}
