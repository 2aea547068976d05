"""Evaluate adapters on a data split with the training code's numbers.

`evaluate_adapters(cfg, adapter_path)` scores every pair of one split twice, both through
`reference.pair_logps` (the trainer's forward and completion-only log-probs):
- reference: the base with no adapters (plus the run's `--init-adapter`, or its `--ref-model`),
  reused from the reference cache that training filled when the model, data and tokenization
  are the same;
- policy: the base with the adapters.
The metrics are `losses.dpo_loss` / `dpo_metrics` over the whole split with the run's loss
settings, so they are the numbers `train` reports for validation (up to float rounding: the
trainer averages per micro-batch, this averages per pair, the same for per-pair losses).

Settings come from the run's adapter_config.json (model, data, tokenization, loss) unless the
caller overrides them; `config_for` does that merge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_dpo import data, reference
from mlx_dpo import model as model_lib
from mlx_dpo.config import ConfigError, TrainConfig
from mlx_dpo.losses import METRIC_KEYS
from mlx_dpo.rundir import RunDir
from mlx_dpo.saved_config import config_for, read_adapter_config  # noqa: F401 (re-exported)

SPLITS = ("valid", "test", "train")  # the default order: the first that has pairs
SCORE_FIELDS = (
    "source",
    "chosen_logps",
    "rejected_logps",
    "reference_chosen_logps",
    "reference_rejected_logps",
    "chosen_reward",
    "rejected_reward",
    "loss",
    "chosen_tokens",
    "rejected_tokens",
)


@dataclass
class EvalResult:
    split: str
    metrics: dict[str, float]  # METRIC_KEYS + preference_accuracy, reference_preference_accuracy
    scores: list[dict] = field(repr=False)  # one dict of SCORE_FIELDS per pair, in data order


def load_eval_pairs(
    cfg: TrainConfig, tokenizer, split: str | None = None, log=print
) -> tuple[str, list]:
    """(split name, tokenized pairs) of `split`, or of the first of valid, test, train that has
    pairs. For the run's own data, "valid" is carved from train exactly as training carved it
    (same fraction and seed) when the data has no validation file, so it is the run's held-out
    set; data given to `eval --data` has valid_fraction 0 (`config_for`): every row is scored."""
    if cfg.data is None:
        raise ConfigError("--data is required (the adapter's config names no data)")
    kwargs = cfg.data_kwargs()
    try:
        rows = data.load_splits(cfg.data, splits=("train", "valid", "test"), **kwargs)
    except data.DataError:
        # Evaluation data need not have a train split; real problems in valid/test raise again.
        rows = data.load_splits(cfg.data, splits=("valid", "test"), **kwargs)
    name = next((s for s in ([split] if split else SPLITS) if rows.get(s)), None)
    if name is None:
        found = ", ".join(f"{s} ({len(r)} rows)" for s, r in rows.items() if r) or "none"
        raise data.DataError(
            f"{cfg.data}: no {split or 'valid, test or train'} split; found: {found}"
        )
    if split is None and name == "train" and cfg.valid_fraction == 0:
        log(f"{cfg.data}: evaluating every row")
    elif split is None and name == "train":
        log(f"{cfg.data}: no held-out split; evaluating on the training rows")
    pairs, stats = data.tokenize_rows(rows[name], tokenizer, **cfg.tokenize_kwargs())
    log(f"{name}: {stats}")
    return name, pairs


def score(
    policy: tuple[np.ndarray, np.ndarray],
    refs: tuple[np.ndarray, np.ndarray],
    pairs: list,
    cfg: TrainConfig,
) -> tuple[dict[str, float], list[dict]]:
    """Split metrics and per-pair scores from summed completion log-probs (each (N,) float32)."""
    from mlx_dpo.losses import dpo_loss, dpo_metrics

    pc, pr, rc, rr = (mx.array(np.asarray(a, np.float32)) for a in (*policy, *refs))
    n_chosen = np.array([len(p.chosen_ids) for p in pairs])
    n_rejected = np.array([len(p.rejected_ids) for p in pairs])
    out = dpo_loss(
        pc,
        pr,
        rc,
        rr,
        chosen_lengths=mx.array(n_chosen),
        rejected_lengths=mx.array(n_rejected),
        # WPO's weights need the policy's per-token distributions, which scoring from summed
        # log-probs does not keep: eval reports the unweighted loss (docs/losses.md).
        **{**cfg.loss_kwargs(), "use_weighting": False},
    )
    metrics = {k: float(v.item()) for k, v in dpo_metrics(out, pc, pr).items()}
    metrics["loss"] = float(out.loss.item())
    metrics = {k: metrics[k] for k in METRIC_KEYS}
    # Does the model itself prefer the chosen answer? Before (reference) and after (policy).
    metrics["preference_accuracy"] = float(np.mean(policy[0] > policy[1]))
    metrics["reference_preference_accuracy"] = float(np.mean(refs[0] > refs[1]))
    columns = (
        [p.source for p in pairs],
        np.asarray(policy[0]).tolist(),
        np.asarray(policy[1]).tolist(),
        np.asarray(refs[0]).tolist(),
        np.asarray(refs[1]).tolist(),
        np.array(out.chosen_rewards).tolist(),
        np.array(out.rejected_rewards).tolist(),
        np.array(out.losses).tolist(),
        n_chosen.tolist(),
        n_rejected.tolist(),
    )
    scores = [dict(zip(SCORE_FIELDS, row, strict=True)) for row in zip(*columns, strict=True)]
    return metrics, scores


def evaluate_adapters(
    cfg: TrainConfig,
    adapter_path: str | Path | None,
    *,
    split: str | None = None,
    log=print,
) -> EvalResult:
    """Metrics and per-pair scores of `adapter_path` (None: the base model alone) on a split."""
    if cfg.model is None:
        raise ConfigError("--model is required (no adapter config names one)")
    loaded = model_lib.load(cfg.model, **cfg.model_kwargs())
    name, pairs = load_eval_pairs(cfg, loaded.tokenizer, split, log)
    if not pairs:
        raise data.DataError(f"{cfg.data}: the {name} split has no pairs to evaluate")
    if adapter_path is not None:
        read_adapter_config(adapter_path)  # a clear error before the reference pass
    if cfg.init_adapter:  # part of the run's reference; the run trained it further
        model_lib.load_adapter_dir(loaded.model, cfg.init_adapter)
    refs = reference.for_run(cfg, loaded, {name: pairs}, log=log)[name]
    if adapter_path is not None:
        _load_adapters(loaded.model, Path(adapter_path), cfg)
    if adapter_path is None and not cfg.ref_model and not cfg.init_adapter:
        policy = refs  # the policy is the reference
    else:
        policy = reference.pair_logps(
            loaded.model,
            pairs,
            batch_size=2 * cfg.batch_size,
            ld_alpha=cfg.ld_alpha,
            label="evaluation",
        )
    metrics, scores = score(policy, refs, pairs, cfg)
    return EvalResult(name, metrics, scores)


def _load_adapters(net, path: Path, cfg: TrainConfig) -> None:
    if not cfg.init_adapter:
        model_lib.load_adapter_dir(net, path)
        return
    # The init adapter's layers are in place; the run's weights are those layers, trained on.
    file = RunDir(path).adapters_file()
    weights = model_lib.read_adapter_weights(file)
    model_lib.check_adapter_weights(net, weights, file)
    net.load_weights(list(weights.items()), strict=False)


def write_scores(scores: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in scores:
            f.write(json.dumps(row) + "\n")
    return path


def format_metrics(result: EvalResult) -> str:
    m = result.metrics
    return "\n".join(
        [
            f"metrics on the {result.split} split ({len(result.scores)} pairs):",
            f"  loss                 {m['loss']:.4f}",
            f"  reward accuracy      {m['rewards/accuracies']:.3f}   (chosen reward > rejected reward)",
            f"  reward margin        {m['rewards/margins']:.4f}",
            f"  rewards chosen       {m['rewards/chosen']:.4f}",
            f"  rewards rejected     {m['rewards/rejected']:.4f}",
            f"  logps chosen         {m['logps/chosen']:.3f}",
            f"  logps rejected       {m['logps/rejected']:.3f}",
            f"  preference accuracy  {m['reference_preference_accuracy']:.3f} -> "
            f"{m['preference_accuracy']:.3f}   (log p(chosen) > log p(rejected): reference -> policy)",
        ]
    )
