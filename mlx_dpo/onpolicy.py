"""On-policy pairs for `mlx_dpo iterate`: read prompts, sample answers, score them, pair them.

Prompts are read by the same readers as `--data` (JSONL/JSON/Parquet, compressed too, with
file:line sources and the same errors): each row needs the prompt field (a string or chat
messages); its other fields go to the reward function.

Sampling goes through mlx-lm's `batch_generate` with `make_sampler(temp, top_p)`, a chunk of
prompts at a time. Each chunk starts from `mx.random.seed` of a seed derived from (run seed,
round, chunk), so a chunk's answers depend only on those and the policy: a run resumed after
a kill regenerates exactly the chunks it had not saved.

Pairing (per prompt): the best-scored sample is chosen, the worst rejected (the first of equal
scores). A prompt gives no pair when fewer than two samples were scored, when all scores are
equal (a tie), when best - worst < `min_margin`, or when the two answers are the same text.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlx_dpo.data_files import DataError, read_records
from mlx_dpo.data_sources import capped
from mlx_dpo.formats import _check_value, get_field
from mlx_dpo.rundir import atomic_write_text

RESERVED = ("prompts", "completions")  # the reward's own argument names


@dataclass
class PromptRow:
    prompt: str | list[dict]
    fields: dict  # the row's other fields, passed to the reward
    source: str  # "prompts.jsonl:7"


def read_prompt_rows(path: str, prompt_field: str = "prompt") -> list[PromptRow]:
    """Every row of a prompts file, checked; DataError lists the bad rows (first 10)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"--prompts {path}: no such file (give a .jsonl, .json or .parquet file)")
    records, problems = read_records(file, path)
    problems = [str(p) for p in problems]
    rows = []
    for source, record in records:
        if not isinstance(record, dict):
            problems.append(f"{source}: expected an object with a '{prompt_field}' field")
            continue
        prompt, found = get_field(record, prompt_field)
        bad = (
            ("missing", f"no '{prompt_field}' field (name it with --prompt-field)")
            if not found
            else _check_value(prompt, prompt_field, is_prompt=True)
        )
        if bad:
            problems.append(f"{source}: {bad[1]}")
            continue
        fields = {k: v for k, v in record.items() if k != prompt_field and k not in RESERVED}
        rows.append(PromptRow(prompt, fields, source))
    if problems:
        raise DataError(capped(problems, path))
    return rows


def chunk_seed(seed: int, round_: int, chunk: int) -> int:
    """A sampling seed per (run seed, round, chunk): independent streams, same on every run."""
    return int(np.random.SeedSequence([seed, round_, chunk]).generate_state(1)[0])


def sample_chunk(model, tokenizer, rows, *, n, temp, top_p, max_tokens, seed, chat_template=None):
    """`n` answers per row (row by row) from one batched generation seeded with `seed`."""
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    tokens = [ids for ids in prompt_tokens(tokenizer, rows, chat_template) for _ in range(n)]
    if not tokens:
        return []
    mx.random.seed(seed)
    response = batch_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        sampler=make_sampler(temp=temp, top_p=top_p),
        completion_batch_size=len(tokens),
        prefill_batch_size=len(tokens),
    )
    return list(response.texts)


def uses_template(tokenizer, chat_template=None) -> bool:
    """Whether prompts are rendered with a chat template (then pairs are written as messages)."""
    from mlx_dpo.encoder import Encoder

    return Encoder(tokenizer, chat_template).has_template


def prompt_tokens(tokenizer, rows, chat_template=None) -> list[list[int]]:
    """Token ids to generate from, as `compare` renders prompts: through the chat template
    with the generation prompt (a string as one user turn), or the text itself without one."""
    from mlx_dpo.encoder import Encoder

    enc = Encoder(tokenizer, chat_template)
    if not enc.has_template and all(isinstance(r.prompt, str) for r in rows):
        return [list(tokenizer.encode(r.prompt)) for r in rows]
    conversations = [
        r.prompt if isinstance(r.prompt, list) else [{"role": "user", "content": r.prompt}]
        for r in rows
    ]
    return enc.generation_prompts(conversations)


def reward_inputs(rows, texts, n):
    """(prompts, completions, fields) for a reward call, one entry per sample (TRL's layout)."""
    prompts = [row.prompt for row in rows for _ in range(n)]
    completions = [
        text if isinstance(p, str) else [{"role": "assistant", "content": text}]
        for p, text in zip(prompts, texts, strict=True)
    ]
    names = sorted({k for row in rows for k in row.fields})
    fields = {k: [row.fields.get(k) for row in rows for _ in range(n)] for k in names}
    return prompts, completions, fields


def batch_name(index: int, rows) -> str:
    first, last = rows[0].source, rows[-1].source
    return f"batch {index + 1} (prompts {first}{'' if first == last else ' to ' + last})"


# ---------------------------------------------------------------------------------------------
# samples.jsonl: appended a chunk at a time, so a kill loses at most the chunk in progress


def append_chunk(path: Path, records: list[dict]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


def read_chunks(path: Path, chunk_sizes: list[int]) -> list[list[dict]]:
    """The whole chunks saved in `path`, in order; the file is cut back to them (a chunk cut
    short by a kill is dropped and sampled again)."""
    if not path.is_file():
        return []
    by_chunk: dict[int, list[dict]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            by_chunk.setdefault(int(record["chunk"]), []).append(record)
        except (ValueError, KeyError, TypeError):
            break  # a line cut short by a kill: the rest of the file is not trusted
    done = []
    for i, size in enumerate(chunk_sizes):
        if len(by_chunk.get(i, [])) != size:
            break
        done.append(by_chunk[i])
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for chunk in done for r in chunk)
    atomic_write_text(path, text)
    return done


# ---------------------------------------------------------------------------------------------
# pairs


@dataclass
class PairStats:
    prompts: int = 0
    samples: int = 0
    scored: int = 0
    mean_reward: float | None = None
    target_share: float | None = None  # share of prompts whose best sample meets --target
    kept: int = 0
    dropped: Counter = None  # reason -> prompts

    def as_dict(self) -> dict:
        return {**self.__dict__, "dropped": dict(self.dropped or {})}


def make_pairs(
    rows, samples, *, n, min_margin, target, as_messages
) -> tuple[list[dict], PairStats]:
    """Best-vs-worst pairs of each prompt's samples (`samples`: records in row order, `n` each)."""
    stats = PairStats(prompts=len(rows), samples=len(samples), dropped=Counter())
    rewards = [s["reward"] for s in samples if s["reward"] is not None]
    stats.scored = len(rewards)
    stats.mean_reward = float(np.mean(rewards)) if rewards else None
    pairs, met = [], 0
    for i, row in enumerate(rows):
        group = [s for s in samples[i * n : (i + 1) * n] if s["reward"] is not None]
        if target is not None and group and max(s["reward"] for s in group) >= target:
            met += 1
        if len(group) < 2:
            stats.dropped["fewer than 2 scored"] += 1
            continue
        best = max(group, key=lambda s: s["reward"])  # max/min keep the first of equals
        worst = min(group, key=lambda s: s["reward"])
        margin = best["reward"] - worst["reward"]
        if margin == 0:
            stats.dropped["all equal"] += 1
        elif margin < min_margin:
            stats.dropped["margin below --min-margin"] += 1
        elif best["completion"] == worst["completion"]:
            stats.dropped["same answer"] += 1
        else:
            pairs.append(_pair_row(row, best, worst, as_messages))
    stats.kept = len(pairs)
    stats.target_share = met / len(rows) if target is not None and rows else None
    return pairs, stats


def _pair_row(row: PromptRow, best: dict, worst: dict, as_messages: bool) -> dict:
    """A TRL-format row: conversational when the samples were generated through the chat
    template (so training renders the pair as the model saw it while sampling)."""
    prompt = row.prompt
    if isinstance(prompt, str) and as_messages:
        prompt = [{"role": "user", "content": prompt}]

    def answer(text: str):
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    return {
        "prompt": prompt,
        "chosen": answer(best["completion"]),
        "rejected": answer(worst["completion"]),
        "score_chosen": best["reward"],
        "score_rejected": worst["reward"],
        "prompt_source": row.source,
    }


def write_pairs(path: Path, pairs: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
