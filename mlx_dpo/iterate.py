"""`mlx_dpo iterate`: on-policy (iterative) DPO, round after round.

Each round samples `--samples` answers per prompt from the current policy, scores them with the
reward, pairs the best with the worst (onpolicy.py), and trains on those pairs with
`run_training`, in a training run directory of its own. Between rounds the adapters continue:
with `--reference start` (the default) the next round's policy starts from them
(`start_adapter`) while its reference stays the base model; with `--reference previous` they are
the next round's `init_adapter`, part of its reference.

The run directory (`--adapter-path`):

    iterate.json        the run's settings, the round and phase it is in, every round's report
    rounds.jsonl        one report per round (round 0: the held-out prompts before training)
    round-N/samples.jsonl   every sample with its reward (appended a chunk at a time)
    round-N/pairs.jsonl     the round's pairs, a valid --data file (score_chosen/score_rejected)
    round-N/train/      the round's training run (adapters, checkpoints, metrics.jsonl)
    adapters.safetensors, adapter_config.json   the newest round's adapters (mlx-lm's format)

`iterate.json` is replaced atomically at each phase change (sample -> train -> eval -> next
round), so `--resume` after a kill continues the phase it was in: sampling from the first
chunk not saved (same seeds, same answers), training through the round's own `--resume`.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

from mlx_dpo import onpolicy
from mlx_dpo.errors import RunError
from mlx_dpo.iterate_config import STATE, IterateConfig, settings
from mlx_dpo.iterate_report import (
    format_round,
    last_metrics,
    plot_rounds,
    print_summary,
    write_rounds,
)
from mlx_dpo.progress import Progress
from mlx_dpo.rewards import JudgeReward, call_reward, load_reward, read_template
from mlx_dpo.rundir import ADAPTERS, CONFIG, RunDir, atomic_write_text

EVAL_ROUND = 0  # the seed stream of held-out sampling: the same before and after every round


def make_reward(icfg: IterateConfig, cfg):
    if icfg.judge_model:
        template = read_template(icfg.judge_template)
        return JudgeReward(
            icfg.judge_model, template, load_kwargs={"compute_dtype": cfg.compute_dtype}
        )
    return load_reward(icfg.reward)


def run_iterate(icfg: IterateConfig, cfg, state: dict | None = None, *, log=print) -> dict:
    """Run (or with `state`, resume) the rounds; returns the final state (its "rounds" reports)."""
    reward_fn = make_reward(icfg, cfg)  # a bad --reward fails before anything loads
    rows = onpolicy.read_prompt_rows(icfg.prompts, cfg.prompt_field)[: icfg.num_prompts]
    eval_rows = []
    if icfg.eval_prompts:
        eval_rows = onpolicy.read_prompt_rows(icfg.eval_prompts, cfg.prompt_field)
    run = RunDir(Path(cfg.adapter_path))
    if not state and run.entries():
        raise RunError(
            f"--adapter-path {run.path} is not empty; pass --resume to continue the run there "
            "or choose another --adapter-path (nothing was overwritten)"
        )
    log(f"run directory: {run.path}{' (resuming)' if state else ''}")
    run.acquire()
    try:
        if not state:
            state = {"settings": settings(icfg, cfg), "round": 1, "phase": "sample"}
            state |= {"policy": None, "before": None, "rounds": [], "current": {}}
            _save(run.path, state)
        else:  # the resumed run's FREE settings (more rounds, say) are the ones given now
            state["settings"] = settings(icfg, cfg)
        _rounds(icfg, cfg, state, run.path, rows, eval_rows, reward_fn, log)
    finally:
        run.release(saved=(run.path / STATE).exists())
    return state


def _rounds(icfg, cfg, state, root: Path, rows, eval_rows, reward_fn, log) -> None:
    if eval_rows and state["before"] is None:
        state["before"] = evaluate(icfg, cfg, eval_rows, None, reward_fn, log)
        _save(root, state)
    if state["round"] > icfg.rounds:
        log(f"the run in {root} has done its {icfg.rounds} rounds; resume with more --rounds")
    while state["round"] <= icfg.rounds:
        r = state["round"]
        rdir = root / f"round-{r}"
        rdir.mkdir(exist_ok=True)
        if state["phase"] == "sample":
            stats = sample_round(icfg, cfg, rows, rdir, r, state["policy"], reward_fn, log)
            state["current"] = {"pairs": stats.as_dict()}
            state["phase"] = "train"
            _save(root, state)
        if state["phase"] == "train":
            kept, needed = state["current"]["pairs"]["kept"], pairs_needed(cfg)
            if kept >= needed:
                train_round(icfg, cfg, rdir, state["policy"], log)
            else:
                log(
                    f"round {r}: {kept} pairs kept, fewer than one update needs ({needed}); "
                    "no training this round, the adapters stay as they are"
                )
            state["phase"] = "eval"
            _save(root, state)
        if state["phase"] == "eval":
            trained = (rdir / "train" / ADAPTERS).is_file()
            policy = str((rdir / "train").resolve()) if trained else state["policy"]
            held_out = evaluate(icfg, cfg, eval_rows, policy, reward_fn, log) if eval_rows else None
            report = {"round": r, **state["current"]["pairs"], "reference": icfg.reference}
            report |= last_metrics(rdir / "train") | {"eval": held_out}
            state["rounds"] = [x for x in state["rounds"] if x["round"] != r] + [report]
            if trained:
                _publish(rdir / "train", root)
            state.update(policy=policy, round=r + 1, phase="sample", current={})
            _save(root, state)
            write_rounds(root, state)
            log(format_round(report, icfg))
    if state["rounds"]:
        print_summary(state, icfg, log)
        if (png := plot_rounds(root)) is not None:
            log(f"plot: {png}")


def pairs_needed(cfg) -> int:
    """Pairs a round needs for one update, counting those its held-out slice takes
    (`valid_fraction`, carved as data_sources.carve_valid does)."""
    per_update = cfg.batch_size * cfg.grad_accumulation_steps
    if cfg.valid_fraction <= 0:
        return per_update
    n = per_update + 1
    while n - min(n - 1, max(1, round(cfg.valid_fraction * n))) < per_update:
        n += 1
    return n


def _save(root: Path, state: dict) -> None:
    atomic_write_text(root / STATE, json.dumps(state, indent=1) + "\n")


def _publish(train_dir: Path, root: Path) -> None:
    """The newest adapters at the top of the run directory, where mlx-lm and `compare` look."""
    for name in (ADAPTERS, CONFIG):
        tmp = root / f"{name}.tmp"
        shutil.copyfile(train_dir / name, tmp)
        os.replace(tmp, root / name)


def load_policy(cfg, policy: str | None):
    from mlx_dpo import model as model_lib

    loaded = model_lib.load(cfg.model, **cfg.model_kwargs())
    if policy is not None:
        model_lib.load_adapter_dir(loaded.model, policy)
    return loaded


def _sample_scored(icfg, cfg, loaded, rows, chunks_done, round_, reward_fn, on_chunk, label):
    """Sample and score `rows` chunk by chunk from chunk `len(chunks_done)`; `on_chunk` saves."""
    n, size = icfg.samples, icfg.sample_batch
    chunks = [rows[i : i + size] for i in range(0, len(rows), size)]
    done = list(chunks_done)
    with Progress(label, len(rows) * n, unit="answers") as progress:
        progress.update(sum(len(c) for c in done))
        for c in range(len(done), len(chunks)):
            texts = onpolicy.sample_chunk(
                loaded.model,
                loaded.tokenizer,
                chunks[c],
                n=n,
                temp=icfg.temperature,
                top_p=icfg.top_p,
                max_tokens=icfg.max_tokens,
                seed=onpolicy.chunk_seed(cfg.seed, round_, c),
                chat_template=cfg.chat_template,
            )
            prompts, completions, fields = onpolicy.reward_inputs(chunks[c], texts, n)
            where = onpolicy.batch_name(c, chunks[c])
            if round_ == EVAL_ROUND:
                where = "held-out " + where
            rewards = call_reward(reward_fn, prompts, completions, fields, where)
            records = [
                {"chunk": c, "prompt": row.source, "sample": k, "completion": t, "reward": w}
                for (row, k), t, w in zip(
                    [(row, k) for row in chunks[c] for k in range(n)], texts, rewards, strict=True
                )
            ]
            on_chunk(records)
            done.append(records)
            progress.update(len(texts))
    return [s for chunk in done for s in chunk]


def sample_round(icfg, cfg, rows, rdir: Path, r: int, policy, reward_fn, log):
    """Sample, score and pair round `r`; writes samples.jsonl and pairs.jsonl."""
    size = icfg.sample_batch
    sizes = [len(rows[i : i + size]) * icfg.samples for i in range(0, len(rows), size)]
    file = rdir / "samples.jsonl"
    done = onpolicy.read_chunks(file, sizes)
    if done:
        log(f"round {r}: {len(done)} of {len(sizes)} sampling batches already saved")
    loaded = load_policy(cfg, policy)
    samples = _sample_scored(
        icfg,
        cfg,
        loaded,
        rows,
        done,
        r,
        reward_fn,
        lambda records: onpolicy.append_chunk(file, records),
        f"round {r} sampling",
    )
    as_messages = onpolicy.uses_template(loaded.tokenizer, cfg.chat_template)
    del loaded
    gc.collect()
    pairs, stats = onpolicy.make_pairs(
        rows,
        samples,
        n=icfg.samples,
        min_margin=icfg.min_margin,
        target=icfg.target,
        as_messages=as_messages,
    )
    onpolicy.write_pairs(rdir / "pairs.jsonl", pairs)
    return stats


def train_round(icfg, cfg, rdir: Path, policy, log):
    from mlx_dpo.run import run_training

    train_dir = rdir / "train"
    previous = icfg.reference == "previous"
    round_cfg = replace(
        cfg,
        data=str((rdir / "pairs.jsonl").resolve()),
        adapter_path=str(train_dir),
        resume=RunDir(train_dir).is_ours(),
        init_adapter=policy if previous else None,
        start_adapter=None if previous else policy,
        demo_summary=False,
    )
    return run_training(round_cfg, log=lambda line: log(f"  {line}"))


def evaluate(icfg, cfg, rows, policy, reward_fn, log) -> dict:
    """Mean reward and target shares of samples on held-out prompts (seeds fixed across rounds)."""
    loaded = load_policy(cfg, policy)
    samples = _sample_scored(
        icfg, cfg, loaded, rows, [], EVAL_ROUND, reward_fn, lambda _: None, "held-out sampling"
    )
    del loaded
    gc.collect()
    rewards = [s["reward"] for s in samples if s["reward"] is not None]
    out = {"prompts": len(rows), "samples": len(samples), "scored": len(rewards)}
    out["mean_reward"] = sum(rewards) / len(rewards) if rewards else None
    if icfg.target is not None and rewards:
        out["sample_target_share"] = sum(w >= icfg.target for w in rewards) / len(rewards)
        _, stats = onpolicy.make_pairs(
            rows, samples, n=icfg.samples, min_margin=0, target=icfg.target, as_messages=False
        )
        out["target_share"] = stats.target_share
    return out
