"""Compose a training run: load -> data -> reference log-probs -> adapters -> train -> save.

`run_training(cfg)` is the Python API behind `mlx_dpo train`. It owns no math: each step is a
call into the module that owns it (model, data, reference, trainer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import mlx.core as mx

from mlx_dpo import checkpoint, data, demo, lifecycle, memory, reference, trainer
from mlx_dpo import model as model_lib
from mlx_dpo.config import TrainConfig
from mlx_dpo.data_report import report_read, write_skipped_rows
from mlx_dpo.model import adapter_config
from mlx_dpo.report import JsonlSink, Reporter, check_sinks, make_sinks
from mlx_dpo.rundir import RunDir
from mlx_dpo.saved_config import read_adapter_config
from mlx_dpo.stop import StopSignals


@dataclass
class RunResult:
    run_dir: Path
    step: int
    train_metrics: dict
    valid_metrics: dict
    summary: dict | None = None
    finished: bool = False  # --resume of a run that had already done all its updates


def distributed_group():
    """MLX's own distributed group when launched with `mlx.launch` (size > 1), else None."""
    if not mx.distributed.is_available():
        return None
    group = mx.distributed.init()
    return group if group.size() > 1 else None


def read_rows(cfg: TrainConfig) -> dict[str, list[dict]]:
    """Read and check every row (cheap: done before the model loads, so bad data fails fast)."""
    return data.load_splits(cfg.data, **cfg.data_kwargs())


def load_pairs(cfg: TrainConfig, tokenizer, log, splits: dict | None = None) -> tuple[list, list]:
    """Tokenized (train, valid) pairs."""
    splits = read_rows(cfg) if splits is None else splits
    out = []
    for split in ("train", "valid"):
        pairs, stats = data.tokenize_rows(splits.get(split, []), tokenizer, **cfg.tokenize_kwargs())
        log(f"{split}: {stats}")
        if isinstance(splits, data.Splits):  # for skipped_rows.jsonl
            splits.skipped += stats.skipped
        out.append(pairs)
    if not out[0]:
        raise data.DataError(
            f"{cfg.data}: no training pairs left after tokenization and truncation"
        )
    return out[0], out[1]


def run_training(cfg: TrainConfig, *, log=print, interactive=None) -> RunResult:
    """Train LoRA/DoRA adapters with the DPO loss family as configured; returns the final metrics.

    The run directory is locked for the whole call; SIGINT/SIGTERM stop it cleanly (see stop.py).
    """
    cfg = demo.with_defaults(cfg)
    group = distributed_group()
    is_main = group is None or group.rank() == 0
    say = log if is_main else (lambda *_: None)
    run = RunDir(Path(cfg.adapter_path))
    say(f"run directory: {run.path}{' (resuming)' if cfg.resume else ''}")
    with StopSignals() as stop:
        if is_main:
            run.acquire()
        try:
            return _run(cfg, run, group, say, stop, interactive)
        finally:
            if is_main:
                run.release(saved=run.has_checkpoints())


def _run(cfg, run: RunDir, group, say, stop, interactive) -> RunResult:
    is_main = group is None or group.rank() == 0
    check_sinks(cfg.report_to)
    # every rank takes the same decisions (rank 0 alone would leave the others waiting)
    resume = lifecycle.open_run(cfg, run, say, writer=is_main)
    if resume is not None and resume.finished:
        return RunResult(run.path, resume.ckpt.step, {}, {}, finished=True)
    if mx.default_device() == mx.cpu:
        mx.set_cache_limit(8 << 30)  # the default 32 MB makes big temporaries page-fault every step
    rows = read_rows(cfg)
    loaded = model_lib.load(cfg.model, **cfg.model_kwargs())
    for note in loaded.notes:
        say(f"model: {note}")
    train_pairs, valid_pairs = load_pairs(cfg, loaded.tokenizer, say, rows)
    if is_main:
        report_read(rows, run.path, say)
    world = group.size() if group else 1
    total = trainer.total_updates(cfg, len(train_pairs), world)
    identity = lifecycle.identity(cfg, train_pairs, valid_pairs)
    if lifecycle.check_changes(cfg, run, resume, identity, total, say):
        return RunResult(run.path, resume.ckpt.step, {}, {}, finished=True)
    cfg = _adopt_adapter_shape(cfg, loaded, say)
    _check_memory(loaded, cfg, train_pairs, say)  # before any heavy work
    refs = reference.for_run(
        cfg, loaded, {"train": train_pairs, "valid": valid_pairs}, group=group, log=say
    )
    train_refs, valid_refs = refs["train"], refs["valid"]
    _add_adapters(cfg, loaded, say)
    optimizer = trainer.build_optimizer(cfg, total)
    start_step = _restore(cfg, run.path, loaded.model, optimizer, say)
    if is_main:  # the first writes into the run directory, after every check has passed
        lifecycle.start_writing(cfg, run, resume, identity, adapter_config(cfg, loaded.model), say)
        write_skipped_rows(rows, run.path)
    reporter = _reporter(cfg, run, total, is_main, interactive)
    say(
        f"training {total} updates of {cfg.batch_size * cfg.grad_accumulation_steps * world} pairs on {len(train_pairs)} pairs ({len(valid_pairs)} held out)"
    )
    try:
        result = trainer.train(
            loaded.model, optimizer, train_pairs, valid_pairs, train_refs, valid_refs, cfg,
            run_dir=run.path, reporter=reporter, start_step=start_step, group=group, stop=stop,
        )  # fmt: skip
    finally:
        reporter.close()
    say(
        f"adapters saved to {run.path}/adapters.safetensors (load with mlx_lm.load(model, adapter_path='{run.path}'))"
    )
    summary = _report_end(cfg, run, loaded, valid_pairs, valid_refs, say) if is_main else None
    return RunResult(run.path, result.step, result.train_metrics, result.valid_metrics, summary)


def _reporter(cfg: TrainConfig, run: RunDir, total: int, is_main: bool, interactive) -> Reporter:
    """Metrics lines, RUN/metrics.jsonl and the --report-to sinks, on the main process only."""
    sinks = [JsonlSink(run.path / "metrics.jsonl", append=True)] if is_main else []
    if is_main:
        sinks += make_sinks(cfg.report_to, run.path, cfg.to_dict())
    return Reporter(total, sinks, enabled=is_main, interactive=interactive, out=None)


def _adopt_adapter_shape(cfg: TrainConfig, loaded, say) -> TrainConfig:
    """An --init-adapter is loaded now (it is part of the reference); a --start-adapter gives
    its shape now and its weights after the reference pass (`_add_adapters`)."""
    if cfg.init_adapter:
        init_config = model_lib.load_adapter_dir(loaded.model, cfg.init_adapter)
        return _adopt_adapter_config(cfg, init_config, say)
    if cfg.start_adapter:
        start_config = read_adapter_config(cfg.start_adapter)
        return _adopt_adapter_config(cfg, start_config, say, in_reference=False)
    return cfg


def _check_memory(loaded, cfg: TrainConfig, train_pairs, say) -> None:
    """Refuse, with numbers and suggestions, a configuration whose step will not fit."""
    step_plan = memory.plan_for_pairs(loaded.model, cfg, train_pairs)
    say(str(step_plan).splitlines()[0])
    if tradeoff := memory.checkpoint_tradeoff(step_plan):
        say(tradeoff)
    memory.check_fits(step_plan)


def _add_adapters(cfg: TrainConfig, loaded, say) -> None:
    """LoRA/DoRA layers with lora_b = 0 (policy == reference at step 0), or the init adapter's
    layers already in place; a start adapter's weights."""
    if not cfg.init_adapter:
        n_train = model_lib.apply_adapters(loaded.model, cfg, seed=cfg.seed)
        if cfg.start_adapter:
            model_lib.load_adapter_weights(loaded.model, Path(cfg.start_adapter))
    else:
        n_train = model_lib.trainable_count(loaded.model)
    if cfg.grad_checkpoint:
        model_lib.enable_grad_checkpoint(loaded.model)
    say(f"adapters: {cfg.fine_tune_type}, {n_train / 1e6:.3f}M trainable parameters")
    loaded.model.train() if cfg.lora_dropout > 0 else loaded.model.eval()


def _report_end(cfg: TrainConfig, run: RunDir, loaded, valid_pairs, valid_refs, say):
    """The plot (with the plot extra) and, on the demo, the before/after summary."""
    from mlx_dpo.plot import plot_run

    if (png := plot_run(run.path)) is not None:
        say(f"plot: {png}")
    if demo.is_demo(cfg) and cfg.demo_summary and valid_pairs:
        from mlx_dpo.demo.summary import demo_summary

        return demo_summary(loaded, valid_pairs, valid_refs, cfg, log=say)
    return None


def _adopt_adapter_config(cfg: TrainConfig, init: dict, log, in_reference=True) -> TrainConfig:
    params = init.get("lora_parameters", {})
    adopted = replace(
        cfg,
        fine_tune_type=init.get("fine_tune_type", "lora"),
        num_layers=init.get("num_layers", cfg.num_layers),
        lora_rank=params.get("rank", cfg.lora_rank),
        lora_scale=params.get("scale", cfg.lora_scale),
        lora_dropout=params.get("dropout", cfg.lora_dropout),
        lora_keys=params.get("keys", cfg.lora_keys),
    )
    if in_reference:
        log(
            f"init adapter {cfg.init_adapter}: training continues from it (rank {adopted.lora_rank}); it is part of the reference"
        )
    else:
        log(
            f"start adapter {cfg.start_adapter}: training continues from it (rank {adopted.lora_rank}); the reference is the base model"
        )
    return adopted


def _restore(cfg, run_dir, model, optimizer, log) -> int:
    optimizer.init(model.trainable_parameters())
    ckpt = checkpoint.load(run_dir) if cfg.resume else None
    if ckpt is None:
        return 0
    model.load_weights(list(ckpt.adapters.items()), strict=False)
    optimizer.state = ckpt.optimizer_state
    mx.eval(model.parameters(), optimizer.state)
    log(f"resumed from step {ckpt.step}")
    return ckpt.step
