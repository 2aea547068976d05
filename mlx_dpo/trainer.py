"""The training loop: one function around one compiled gradient step.

Per update: `grad_accumulation_steps` micro-batches, each ONE forward over [chosen rows;
rejected rows] with completion-only log-probs, `nn.value_and_grad` over the LoRA parameters,
gradients averaged (over micro-batches and, distributed, over ranks with mlx's
`average_gradients`), clipped, applied: `make_step`, which the benchmarks and the memory tests
run too. The loop body is: eval when due -> step -> report when due -> save when due. Host syncs
happen only at report/eval/save time; metrics accumulate as lazy MLX arrays in between.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_map

from mlx_dpo import _testhooks, checkpoint, shared_prompt
from mlx_dpo.data import Batch, eval_batches, iterate_batches
from mlx_dpo.logps import forward_logps, forward_only, forward_pair_logps
from mlx_dpo.losses import METRIC_KEYS, dpo_loss, dpo_metrics, pair_extras
from mlx_dpo.stop import Interrupted, StopSignals


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class TrainResult:
    step: int
    train_metrics: dict[str, float]
    valid_metrics: dict[str, float]


def batch_loss(model: nn.Module, batch: Batch, loss_kwargs: dict):
    """DPO loss of one micro-batch. Returns (loss, metrics dict of scalars)."""
    b = batch.ref_chosen.shape[0]
    ld_alpha, wpo = loss_kwargs.get("ld_alpha"), loss_kwargs.get("use_weighting", False)
    if ld_alpha is None and not wpo:
        (logps, counts), extras = forward_logps(model, batch), {}
    else:  # LD-DPO / WPO need per-token information from the head
        fwd = forward_pair_logps(model, batch, ld_alpha=ld_alpha, with_weights=wpo)
        logps, counts, extras = fwd.logps, fwd.counts, pair_extras(fwd, b)
    policy_chosen, policy_rejected = logps[:b], logps[b:]
    out = dpo_loss(
        policy_chosen,
        policy_rejected,
        batch.ref_chosen,
        batch.ref_rejected,
        chosen_lengths=counts[:b],
        rejected_lengths=counts[b:],
        **extras,
        **loss_kwargs,
    )
    metrics = dpo_metrics(out, policy_chosen, policy_rejected)
    metrics["loss"] = out.loss
    return out.loss, metrics


# A Batch's host-side bookkeeping: not inputs of the compiled functions (n_tokens would be
# part of their cache key and trace them again for every batch).
_HOST_FIELDS = ("index", "n_tokens")


def _arrays(batch: Batch) -> dict:
    """A Batch as the compiled functions take it: its arrays by name (mx.compile takes trees of
    arrays, not dataclasses)."""
    return {f.name: getattr(batch, f.name) for f in fields(batch) if f.name not in _HOST_FIELDS}


def _traced(arrays: dict) -> Batch:
    """The Batch again inside a compiled function (the loss reads only its arrays)."""
    return Batch(**arrays, index=None, n_tokens=0)


def build_schedule(cfg, total_steps: int):
    decay_steps = max(total_steps - cfg.warmup_steps, 1)
    decay = {
        "cosine": lambda: optim.cosine_decay(cfg.learning_rate, decay_steps, 0.0),
        "linear": lambda: optim.linear_schedule(cfg.learning_rate, 0.0, decay_steps),
        "constant": lambda: lambda _: mx.array(cfg.learning_rate, dtype=mx.float32),
    }[cfg.lr_schedule]()
    if cfg.warmup_steps <= 0:
        return decay
    warmup = optim.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps)
    return optim.join_schedules([warmup, decay], [cfg.warmup_steps])


def build_optimizer(cfg, total_steps: int) -> optim.Optimizer:
    lr = build_schedule(cfg, total_steps)
    makers = {
        "adamw": lambda: optim.AdamW(lr, weight_decay=cfg.weight_decay),
        "adam": lambda: optim.Adam(lr),
        "sgd": lambda: optim.SGD(lr),
        "adafactor": lambda: optim.Adafactor(lr),
        "lion": lambda: optim.Lion(lr, weight_decay=cfg.weight_decay),
        "muon": lambda: optim.Muon(lr),
    }
    return makers[cfg.optimizer]()


def total_updates(cfg, n_pairs: int, world_size: int = 1) -> int:
    if cfg.epochs is None:
        return cfg.iters
    per_update = cfg.batch_size * cfg.grad_accumulation_steps * world_size
    return max(1, math.ceil(cfg.epochs * (n_pairs // per_update)))


def evaluate(model, pairs, refs, cfg, *, max_batches: int = -1, group=None) -> dict[str, float]:
    """Pair-weighted mean of the training metrics over `pairs` (the first `max_batches` batches
    when >= 0), without gradients; distributed, each rank scores its share and the sums are
    added up."""
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    loss_kwargs = cfg.loss_kwargs()
    sums: dict[str, mx.array] = {}
    n = 0
    batches = eval_batches(
        pairs, cfg.batch_size, rank=rank, world_size=world, max_batches=max_batches,
        ref_chosen=refs[0], ref_rejected=refs[1], share_prompt=shared_prompt.active(model),
    )  # fmt: skip
    for batch in batches:
        _, metrics = _eval_loss(model, loss_kwargs)(_arrays(batch))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v * batch.size
        n += batch.size
        mx.eval(sums)
    keys = METRIC_KEYS
    totals = mx.array([float(n)] + [sums[k].item() if k in sums else 0.0 for k in keys])
    if world > 1:
        totals = mx.distributed.all_sum(totals, group=group)
    totals = totals.tolist()
    return {k: v / max(totals[0], 1) for k, v in zip(keys, totals[1:], strict=True)}


class TrainStep:
    """The training step of one optimizer update (see `make_step`).

    `step(micro_batches)` -> (metrics, gradient norm before clipping), lazy: each
    micro-batch's forward and backward, gradients averaged over the micro-batches and over the
    ranks of `group` (mlx's `average_gradients`), clipped to `cfg.max_grad_norm`, applied.
    `grads(micro_batches)` and `update(grads)` are its two halves (the benchmarks time each);
    `state` is what to `mx.eval` after a step.
    """

    def __init__(self, model, optimizer, cfg, *, group=None, compile=True, loss=None):
        loss, loss_kwargs = loss or batch_loss, cfg.loss_kwargs()
        loss_and_grad = nn.value_and_grad(
            model, lambda model, arrays: loss(model, _traced(arrays), loss_kwargs)
        )
        self.state = [model.state, optimizer.state, mx.random.state]
        self.group = group

        def grad_step(arrays):
            (_, metrics), grads = loss_and_grad(model, arrays)
            return metrics, grads

        def apply_update(grads):
            grads, norm = _clip(grads, cfg.max_grad_norm)
            optimizer.update(model, grads)
            return norm

        if compile:
            compiled = partial(mx.compile, inputs=self.state, outputs=self.state)
            grad_step, apply_update = compiled(grad_step), compiled(apply_update)
        self._grad_step, self._apply_update = grad_step, apply_update

    def grads(self, micro_batches: list[Batch]):
        """(metrics, gradients), each averaged over the micro-batches (and ranks), lazy."""
        grads, metrics = None, None
        for batch in micro_batches:
            m, g = self._grad_step(_arrays(batch))
            grads = g if grads is None else tree_map(mx.add, grads, g)
            metrics = m if metrics is None else {k: metrics[k] + m[k] for k in m}
        n = len(micro_batches)
        if n > 1:
            grads = tree_map(lambda g: g / n, grads)
            metrics = {k: v / n for k, v in metrics.items()}
        if self.group is not None and self.group.size() > 1:
            grads = average_gradients(grads, group=self.group)
        return metrics, grads

    def update(self, grads) -> mx.array:
        """Clip and apply `grads`; returns their norm before clipping."""
        return self._apply_update(grads)

    def __call__(self, micro_batches: list[Batch]):
        metrics, grads = self.grads(micro_batches)
        return metrics, self.update(grads)


def make_step(model, optimizer, cfg, *, group=None, compile=True, loss=None) -> TrainStep:
    """The training step of one optimizer update, compiled (`TrainStep`). Used by `train`,
    the memory tests and the benchmarks, so what is measured is what trains. `loss` replaces
    `batch_loss` (same signature; a benchmark variant); `compile=False` runs it eagerly."""
    return TrainStep(model, optimizer, cfg, group=group, compile=compile, loss=loss)


def train(
    model,
    optimizer,
    train_pairs,
    valid_pairs,
    train_refs,
    valid_refs,
    cfg,
    *,
    run_dir: Path,
    reporter,
    start_step: int = 0,
    group=None,
    on_save=None,
    stop: StopSignals | None = None,
) -> TrainResult:
    """Run updates start_step+1 .. `total_updates` of `make_step`; `*_refs` are the pairs'
    (chosen, rejected) reference log-probs (numpy). Each update: validation when due
    (`steps_per_eval`), the step, a report every `steps_per_report`, a checkpoint every
    `save_every` and at the end (then `on_save(step)`). NaN/inf raises NonFiniteLoss at the next
    report or save; a signal (`stop`: the run's handler, or one installed here) saves the work
    so far and raises `Interrupted`. Distributed (`group`): each rank steps on its share of
    every update, rank 0 saves. Returns the last step and train and validation metrics."""
    world, rank = (group.size(), group.rank()) if group else (1, 0)
    total = total_updates(cfg, len(train_pairs), world)
    step_fn = make_step(model, optimizer, cfg, group=group)
    updates = iterate_batches(
        train_pairs, cfg.batch_size, grad_accumulation_steps=cfg.grad_accumulation_steps,
        seed=cfg.seed, start_step=start_step, rank=rank, world_size=world,
        ref_chosen=train_refs[0], ref_rejected=train_refs[1],
        share_prompt=shared_prompt.active(model),
    )  # fmt: skip
    validate = partial(_validate, model, valid_pairs, valid_refs, cfg, group, reporter)
    window = _Window()
    step, last_train, last_valid = start_step, {}, {}
    with stop or StopSignals() as stop:
        stop.graceful = True  # from here on a signal saves the work done so far
        for update in updates:
            if step >= total:
                break
            if cfg.steps_per_eval and step > start_step and step % cfg.steps_per_eval == 0:
                last_valid = validate(step)
            # dropout's randomness is a function of (seed, step): a resumed run replays it exactly
            mx.random.seed(cfg.seed * 1_000_003 + update.step)
            metrics, norm = step_fn(update.micro_batches)
            window.add(metrics, norm, update.micro_batches)
            mx.eval(step_fn.state, window.sums, window.finite)
            step = update.step + 1  # updates done (Update.step counts from 0)
            _testhooks.point("update", step)
            reporter.progress(step)
            if step % cfg.steps_per_report == 0 or step == total:
                _check_finite(window.finite, step)
                last_train = window.flush(optimizer, world, group)
                reporter.log("train", step, last_train)
            if step % cfg.save_every == 0 or step == total or stop.requested:
                _check_finite(window.finite, step)
                meta = {"epoch": update.epoch, "total": total}
                _save(run_dir, step, model, optimizer, meta, rank, on_save)
            if stop.requested:
                raise Interrupted(_stopped_message(stop.signum, step, run_dir), stop.signum)
    if cfg.steps_per_eval:
        last_valid = validate(step)
    return TrainResult(step, last_train, last_valid)


def _validate(model, pairs, refs, cfg, group, reporter, step: int) -> dict[str, float]:
    """The validation pass (`evaluate` on `cfg.val_batches` batches), logged; {} without
    validation pairs."""
    if not pairs:
        return {}
    metrics = evaluate(model, pairs, refs, cfg, max_batches=cfg.val_batches, group=group)
    reporter.log("valid", step, metrics)
    return metrics


def _eval_loss(model, loss_kwargs):
    """batch_loss compiled for the validation pass (forward only), one per model and loss:
    eager, every op is dispatched on its own and the fused kernels' exp runs as separate ops;
    kept across calls so that a later evaluation does not trace its lengths again. The model's
    state is an input: the adapters it reads change between evaluations."""
    key = (id(model), repr(sorted(loss_kwargs.items())))
    if key not in _EVAL_LOSS:
        _EVAL_LOSS.clear()  # one model at a time: drop another model's traces
        state = [model.state, mx.random.state]  # random: LoRA dropout, as the eager pass drew
        fn = partial(_loss_of_arrays, model, loss_kwargs=loss_kwargs)
        _EVAL_LOSS[key] = mx.compile(fn, inputs=state, outputs=state)
    return _EVAL_LOSS[key]


_EVAL_LOSS: dict = {}


def compiled_logps(model, ld_alpha: float | None = None):
    """batch -> `forward_logps`' summed log-probs (float32, no gradient), compiled for the
    reference pass: eagerly every op is dispatched on its own and the CPU kernels' exp runs
    unfused. One per pass: the trace holds the model's modules as they are (adapters on or
    off); its state is an input, not constants copied into the trace."""

    def logps_of_arrays(arrays: dict) -> mx.array:
        with forward_only():  # traced here: a head keeping logits for a backward keeps none
            logps, _ = forward_logps(model, _traced(arrays), ld_alpha=ld_alpha)
        return mx.stop_gradient(logps).astype(mx.float32)

    compiled = mx.compile(logps_of_arrays, inputs=[model.state])
    return lambda batch: compiled(_arrays(batch))


def _loss_of_arrays(model, arrays: dict, loss_kwargs: dict):
    with forward_only():  # the validation pass: no backward
        return batch_loss(model, _traced(arrays), loss_kwargs)


def _clip(grads, max_norm: float):
    if max_norm and max_norm > 0:
        return optim.clip_grad_norm(grads, max_norm)
    from mlx.utils import tree_flatten

    norm = mx.sqrt(sum((g.astype(mx.float32) ** 2).sum() for _, g in tree_flatten(grads)))
    return grads, norm


def _check_finite(finite: mx.array, step: int) -> None:
    if not finite.item():
        raise NonFiniteLoss(
            f"the loss or gradient became NaN/inf by step {step}; the last good checkpoint is kept. "
            "Lower --learning-rate or --beta, or set --max-grad-norm."
        )


def _save(run_dir, step, model, optimizer, meta, rank, on_save) -> None:
    from mlx_dpo.model import adapter_weights

    # Check the parameters about to be saved, not a proxy: every rank holds the same ones, so
    # every rank takes the same decision.
    adapters = adapter_weights(model)
    if not checkpoint.all_finite(adapters):
        raise NonFiniteLoss(
            f"the adapter weights became NaN/inf at step {step}; nothing was saved from it and "
            "the last good checkpoint is kept. Lower --learning-rate or --beta, or set --max-grad-norm."
        )
    if rank != 0:
        return
    checkpoint.save(run_dir, step, adapters, optimizer.state, meta)
    if on_save:
        on_save(step)


def _stopped_message(signum, step: int, run_dir) -> str:
    import shlex
    import signal

    return (
        f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
        f"{run_dir}. Continue with: mlx_dpo train --resume --adapter-path {shlex.quote(str(run_dir))}"
    )


class _Window:
    """Metrics accumulated between two reports, as lazy arrays (no host sync per step), and
    whether every gradient norm so far was finite."""

    def __init__(self):
        self.finite = mx.array(True)
        self.reset()

    def reset(self):
        self.sums: dict[str, mx.array] = {}
        self.steps, self.tokens, self.pairs = 0, 0, 0
        self.t0 = time.perf_counter()
        mx.reset_peak_memory()

    def add(self, metrics: dict, norm: mx.array, micro_batches: list[Batch]) -> None:
        for k, v in {**metrics, "grad_norm": norm}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1
        # the norm is of the rank-averaged gradient, so every rank takes the same decision
        self.finite = self.finite & mx.isfinite(norm)
        self.tokens += sum(batch.n_tokens for batch in micro_batches)
        self.pairs += sum(batch.size for batch in micro_batches)

    def flush(self, optimizer, world: int, group) -> dict[str, float]:
        keys = sorted(self.sums)
        values = mx.stack([self.sums[k] for k in keys]) / max(self.steps, 1)
        if world > 1:  # every rank saw different pairs: average the means over ranks
            values = mx.distributed.all_sum(values, group=group) / world
        out = dict(zip(keys, values.tolist(), strict=True))
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        out["lr"] = float(optimizer.learning_rate.item())
        out["tokens_per_sec"] = self.tokens * world / seconds
        out["pairs_per_sec"] = self.pairs * world / seconds
        out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
        self.reset()
        return out
