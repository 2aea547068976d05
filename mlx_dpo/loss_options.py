"""The loss options' rules, without MLX: `TrainConfig` checks a configuration with them before
anything heavy is imported (so a bad flag is reported in a fraction of a second).
`mlx_dpo.losses` re-exports them; a test keeps LOSS_TYPES equal to the keys of its LOSSES.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
    "simpo",
    "orpo",
)
F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16 accepts a non-default f-divergence only on these ("difference" losses).
F_DIVERGENCE_LOSSES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop")
F_DIVERGENCE_LOSSES += ("sft",)
# The losses that read label_smoothing; on any other it would silently do nothing.
LABEL_SMOOTHING_LOSSES = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired", "simpo")


def check_loss_options(
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    f_divergence_type: str = "reverse_kl",
    rpo_alpha: float | None = None,
    use_weighting: bool = False,
    ld_alpha: float | None = None,
    **other_options: Any,
) -> tuple[list[str], list[float]]:
    """Check ``dpo_loss``'s options without any data (a config can call it with all of them).

    Returns:
        The loss type names and their weights, ``sft`` appended when ``rpo_alpha`` is set.
    Raises:
        ValueError naming the bad option and the valid choices.
    """
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(names) if loss_weights is None else [float(w) for w in loss_weights]
    if rpo_alpha is not None:
        names, weights = names + ["sft"], weights + [float(rpo_alpha)]
    eps = label_smoothing
    unknown = [n for n in names if n not in LOSS_TYPES]
    if unknown or not names:
        raise ValueError(f"unknown loss_type {unknown or names}; valid ones: {sorted(LOSS_TYPES)}")
    if len(weights) != len(names):
        raise ValueError(f"loss_weights has {len(weights)} entries for {len(names)} loss types")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing is a label-flip probability in [0, 0.5), got {eps}")
    if "exo_pair" in names and eps <= 0:
        raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (1e-3 is a common value)")
    if eps > 0 and not set(names) & set(LABEL_SMOOTHING_LOSSES):
        raise ValueError(f"label_smoothing only applies to {LABEL_SMOOTHING_LOSSES}, not {names}")
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"f_divergence_type must be one of {list(F_DIVERGENCE_TYPES)}")
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(
            f"ld_alpha is LD-DPO's weight of the longer answer's tail, in [0, 1]; got {ld_alpha}"
        )
    if use_weighting and {"aot", "aot_unpaired"} & set(names):
        # AOT's per-example losses come out sorted: they no longer belong to a pair (as TRL)
        raise ValueError("use_weighting (WPO) does not apply to aot/aot_unpaired (sorted losses)")
    refused = [n for n in names if n not in F_DIVERGENCE_LOSSES]
    if f_divergence_type != "reverse_kl" and refused:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} only applies to {F_DIVERGENCE_LOSSES}; "
            f"not to {refused}"
        )
    return names, weights
