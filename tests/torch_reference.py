"""Our own small PyTorch (float64) reference of the DPO math, written from the papers' formulas
(DPO paper code, TRL 1.16's DPOTrainer) and kept deliberately naive: plain formulas, one
if/elif chain, loops over rows, no shared code with mlx_dpo. The tests compare mlx_dpo's float32
MLX code against it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def batch_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """The DPO paper code's per-sequence log-prob: logit t scores label t+1, -100 not counted.

    One deliberate difference: ``average`` of a row without counted tokens is 0 (paper: NaN).
    """
    logits = logits[:, :-1].double()
    labels = labels[:, 1:].clone()
    mask = labels != -100
    labels[~mask] = 0
    per_token = torch.gather(logits.log_softmax(-1), 2, labels.unsqueeze(2)).squeeze(2)
    total = (per_token * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def pair_sequence_stats(
    logits: torch.Tensor, labels: torch.Tensor, ld_alpha: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of [chosen rows; rejected rows] (row r's pair partner is r +- B), from full logits
    (2B, T, V) and labels (2B, T) as in ``batch_logps``, float64:

    - the plain sum of the counted tokens' log-probs;
    - LD-DPO's sum (Liu et al. 2024; TRL 1.16 ``ld_alpha``): with l = the shorter of the pair's
      two completions, its first l tokens count fully, the rest ld_alpha times;
    - WPO's weight (Zhou et al. 2024, Eq. 2; TRL 1.16 ``use_weighting``):
      exp(mean over counted tokens of log p_t - log sum_v p_v^2), 1 for a row with no token.
    """
    logp = logits[:, :-1].double().log_softmax(-1)
    labels = labels[:, 1:]
    rows = logp.shape[0]
    tokens, log_sum_sq = [], []
    for r in range(rows):
        at = (labels[r] != -100).nonzero().flatten()
        tokens.append(logp[r, at, labels[r, at]])
        log_sum_sq.append(torch.log((logp[r, at].exp() ** 2).sum(-1)))
    plain, ld, weight = [], [], []
    for r in range(rows):
        partner = tokens[(r + rows // 2) % rows]
        shared = min(len(tokens[r]), len(partner))
        plain.append(tokens[r].sum())
        ld.append(tokens[r][:shared].sum() + ld_alpha * tokens[r][shared:].sum())
        mean = (tokens[r] - log_sum_sq[r]).sum() / max(len(tokens[r]), 1)
        weight.append(torch.exp(mean))
    return torch.stack(plain), torch.stack(ld), torch.stack(weight)


def f_score(u: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f-divergence score of a log-ratio (TRL 1.16)."""
    if kind == "reverse_kl":
        return u
    if kind == "forward_kl":
        return 1 - torch.exp(-u)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(u)
    if kind == "alpha_divergence":
        if alpha == 1:
            return u
        return (torch.exp(torch.clamp((alpha - 1) * u, max=80)) - 1) / (alpha - 1)
    raise ValueError(kind)


def per_example_loss(
    loss_type: str,
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor,
    rr: torch.Tensor,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    ipo_length_normalize: bool = True,
    simpo_gamma: float = 0.5,
) -> torch.Tensor:
    """l[i] of one loss type; pc, pr, rc, rr are (B,) summed log-probs."""
    eps = label_smoothing
    clr, rlr = pc - rc, pr - rr
    cs = f_score(clr, f_divergence_type, f_alpha_divergence_coef)
    rs = f_score(rlr, f_divergence_type, f_alpha_divergence_coef)
    d = cs - rs
    lc = None if chosen_lengths is None else chosen_lengths.clamp(min=1)
    lr = None if rejected_lengths is None else rejected_lengths.clamp(min=1)
    if loss_type == "sigmoid":  # DPO Eq. 7; cDPO with eps
        return -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "ipo":
        h = cs / lc - rs / lr if ipo_length_normalize else d
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        z = beta * d
        return torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
    if loss_type == "nca_pair":
        return (
            -F.logsigmoid(beta * clr)
            - 0.5 * F.logsigmoid(-beta * clr)
            - 0.5 * F.logsigmoid(-beta * rlr)
        )
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(beta * d) + eps * F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * clr) - F.logsigmoid(-beta * rlr)
    if loss_type == "sppo_hard":
        return (clr - 1 / (2 * beta)) ** 2 + (rlr + 1 / (2 * beta)) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = torch.sort(pc - pr)[0] - torch.sort(rc - rr)[0]
        else:
            delta = torch.sort(clr)[0] - torch.sort(rlr)[0]
        return -(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta)
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * clr)) + torch.sigmoid(beta * rlr)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * clr) + (1 - torch.sigmoid(beta * (clr - rlr)))
    if loss_type == "discopop":
        z = beta * d
        m = torch.sigmoid(z / discopop_tau)
        return -F.logsigmoid(z) * (1 - m) + torch.exp(-z) * m
    if loss_type == "sft":
        # mean NLL over every chosen token of the batch, -sum(pc) / sum(lc); as per-example
        # values whose mean is that number, example i gets its share -pc[i] * B / sum(lc)
        return -pc * len(pc) / lc.sum()
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * (cs / lc - rs / lr))
    if loss_type == "simpo":  # Meng et al. 2024
        x = beta * (pc / lc - pr / lr) - simpo_gamma
        return -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
    if loss_type == "orpo":  # Hong et al. 2024, lambda = beta
        mc, mr = pc / lc, pr / lr
        log_odds = (mc - torch.log1p(-torch.exp(mc))) - (mr - torch.log1p(-torch.exp(mr)))
        return -mc - beta * F.logsigmoid(log_odds)
    raise ValueError(loss_type)


def dpo_loss(
    pc: torch.Tensor,
    pr: torch.Tensor,
    rc: torch.Tensor | None = None,
    rr: torch.Tensor | None = None,
    *,
    beta: float = 0.1,
    loss_type: str | list[str] = "sigmoid",
    loss_weights: list[float] | None = None,
    reference_free: bool = False,
    rpo_alpha: float | None = None,
    use_weighting: bool = False,
    chosen_weights: torch.Tensor | None = None,
    rejected_weights: torch.Tensor | None = None,
    sft_chosen_logps: torch.Tensor | None = None,
    ld_alpha: float | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, losses, chosen_rewards, rejected_rewards); loss = sum_k w_k mean_i l_k[i].

    As the DPO paper code: reference_free zeroes the reference in the loss only; the rewards
    stay beta (policy - reference), and are beta policy without a reference. WPO (TRL 1.16):
    every loss type's per-example values are multiplied by chosen_weights * rejected_weights.
    LD-DPO: pc..rr are already LD-DPO's sums; sft reads sft_chosen_logps (the plain sums)."""
    if rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    rc_loss, rr_loss = (torch.zeros_like(pc), torch.zeros_like(pr)) if reference_free else (rc, rr)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = list(loss_weights) if loss_weights is not None else [1.0] * len(types)
    if rpo_alpha is not None:
        types, weights = types + ["sft"], weights + [rpo_alpha]
    per_type = []
    for t in types:
        chosen = sft_chosen_logps if t == "sft" and sft_chosen_logps is not None else pc
        lk = per_example_loss(t, chosen, pr, rc_loss, rr_loss, beta=beta, **options)
        if use_weighting:
            lk = lk * (chosen_weights * rejected_weights).detach()
        per_type.append(lk)
    loss = sum(w * lk.mean() for w, lk in zip(weights, per_type, strict=True))
    losses = sum(w * lk for w, lk in zip(weights, per_type, strict=True))
    return loss, losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()
