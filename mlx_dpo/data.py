"""Preference data: rows -> tokenized pairs -> length-bucketed batches.

Reading and checking rows (files, directories, Hub datasets) is in `mlx_dpo.data_sources`;
`load_splits` and `DataError` are re-exported here. Tokenization follows TRL 1.16:

- conversational rows: `prompt = template(prompt, add_generation_prompt=True)` and
  `template(prompt + chosen)` rendered whole; standard rows: `prompt` and
  `prompt + chosen + EOS` (EOS text appended when missing) tokenized as they are, with no
  special tokens but a BOS where the tokenizer adds one by itself, for both alike.
- the completion is what follows the common token prefix of the prompt and the whole row, so
  template artifacts and BPE merges across the boundary move into the completion. Chosen and
  rejected share one prompt: the shorter of the two prefixes.
- only completion tokens are scored, the end-of-turn token (and ChatML's "\\n") included.

Truncation (`tokenize_rows`): first the prompt is cut to `max_prompt_length`, keeping its
first tokens (`keep_start`) or its last ones (`keep_end`: the latest turns and the generation
prompt; a leading BOS is kept). Then a pair whose prompt still fills `max_length` is dropped,
and each completion is cut at its end to fit `prompt + completion <= max_length`.

Batch shape contract (B pairs per micro-batch; `collate`):

| field         | shape / dtype     | meaning                                                     |
|---------------|-------------------|-------------------------------------------------------------|
| `tokens`      | (2B, T) int32     | rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected, right-  |
|               |                   | padded with 0; T a multiple of `pad_to`                     |
| `mask`        | (2B, T-1) float32 | aligned with targets `tokens[:, 1:]`: 1 where the target is |
|               |                   | a completion token (EOS included), 0 on prompt and padding  |
| `positions`   | (2B, C) int32     | the t whose target `tokens[:, t+1]` is a completion token,  |
|               |                   | in order, 0-padded; C a multiple of `pad_to`                |
| `targets`     | (2B, C) int32     | `tokens[r, positions + 1]`, 0 in padding                    |
| `target_mask` | (2B, C) float32   | 1 on real completion targets                                |
| `ref_chosen`, | (B,) float32      | reference log-probs summed over each completion, or None    |
| `ref_rejected`|                   |                                                             |
| `index`       | (B,) int          | the pairs' indices in the list given to iterate_batches     |
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from jinja2 import TemplateError

from mlx_dpo.data_sources import DataError, capped, common_prefix_length, load_splits

__all__ = [
    "Batch",
    "DataError",
    "PreferencePair",
    "TokenizeStats",
    "Update",
    "collate",
    "dataset_stats",
    "iterate_batches",
    "load_splits",
    "tokenize_rows",
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class PreferencePair:
    """One tokenized pair; `chosen_ids`/`rejected_ids` are completion tokens only."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str  # "path/train.jsonl:17" or "org/name[train]:row 17"
    prompt: str | list[dict]  # the original prompt (text or messages)
    truncated: bool = False


@dataclass
class TokenizeStats:
    """What `tokenize_rows` kept and cut. Lengths are before truncation, per tokenized row."""

    n_rows: int = 0
    n_pairs: int = 0
    n_truncated: int = 0  # kept, but prompt or a completion was cut
    n_dropped: int = 0  # prompt alone >= max_length
    n_identical: int = 0  # chosen == rejected (after truncation): no learning signal
    n_boundary_merged: int = 0  # prompt tokens that moved into the completion at the boundary
    max_length: int | None = None
    max_prompt_length: int | None = None
    prompt_lengths: list[int] = field(default_factory=list, repr=False)
    chosen_lengths: list[int] = field(default_factory=list, repr=False)
    rejected_lengths: list[int] = field(default_factory=list, repr=False)

    def __str__(self) -> str:
        return (
            f"{self.n_rows} rows -> {self.n_pairs} pairs ({self.n_truncated} truncated, "
            f"{self.n_dropped} dropped with prompt >= max_length={self.max_length}, "
            f"{self.n_identical} skipped as chosen == rejected)"
        )


# ---------------------------------------------------------------------------------------------
# Tokenization


def resolve_chat_template(chat_template: str | None) -> str | None:
    """A template given as "chatml", a file path, or the Jinja text itself."""
    if chat_template is None or chat_template.lower() == "chatml":
        return chat_template and CHATML
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = Path(chat_template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(
        f"--chat-template {chat_template!r}: not a file, 'chatml', or a Jinja template string"
    )


class _Encoder:
    """Text -> token ids the same way for prompts and whole rows."""

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(chat_template)
        hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper wraps HF
        self.hf = hf
        own = getattr(tokenizer, "has_chat_template", None)  # the wrapper knows custom renderers
        if own is None:
            own = getattr(hf, "chat_template", None) is not None
        self.has_template = self.template is not None or bool(own)
        self.eos_text = getattr(hf, "eos_token", None)
        # BOS only where the tokenizer adds one on its own (Llama, Gemma; not Qwen/ChatML).
        bos = getattr(hf, "bos_token_id", None)
        default = hf.encode("a") if bos is not None else []
        self.bos_id = bos if default and default[0] == bos else None

    def text(self, text: str) -> list[int]:
        ids = list(self.hf.encode(text, add_special_tokens=False))
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]  # unless the text already starts with it
        return ids

    def chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        if self.template is not None:
            rendered = self.hf.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                chat_template=self.template,
            )
        else:  # through the wrapper, which adds mlx-lm's thinking switch
            rendered = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        # Templates write their own special tokens (BOS included), as HF tokenizes them.
        return list(self.hf.encode(rendered, add_special_tokens=False))

    def with_eos(self, text: str) -> str:
        if self.eos_text and not text.endswith(self.eos_text):
            return text + self.eos_text
        return text


def tokenize_pair(row: dict, enc: _Encoder) -> tuple[list[int], list[int], list[int], int]:
    """(prompt_ids, chosen_ids, rejected_ids, merged) before truncation; raises ValueError."""
    prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    if isinstance(prompt, list):
        prompt_ids = enc.chat(prompt, add_generation_prompt=True)
        full_chosen, full_rejected = enc.chat(prompt + chosen), enc.chat(prompt + rejected)
    else:
        prompt_ids = enc.text(prompt)
        full_chosen = enc.text(prompt + enc.with_eos(chosen))
        full_rejected = enc.text(prompt + enc.with_eos(rejected))
    # The boundary is where the prompt and both rows stop agreeing (TRL's common prefix).
    k = min(
        common_prefix_length(prompt_ids, full_chosen),
        common_prefix_length(prompt_ids, full_rejected),
    )
    if k == 0:
        raise ValueError(
            "the prompt has no tokens of its own (it merges into the answer); end the prompt "
            "with a space or newline"
        )
    for name, full in (("chosen", full_chosen), ("rejected", full_rejected)):
        if len(full) == k:
            raise ValueError(f"the {name} completion has no tokens after the prompt")
    return full_chosen[:k], full_chosen[k:], full_rejected[k:], len(prompt_ids) - k


def truncate_pair(
    prompt: list[int],
    chosen: list[int],
    rejected: list[int],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    truncation_mode: str,
    bos_id: int | None,
) -> tuple[list[int], list[int], list[int], bool] | None:
    """Cut a pair to its budget (see the module docstring); None when it must be dropped."""
    truncated = False
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        truncated = True
        if truncation_mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        elif bos_id is not None and prompt[0] == bos_id:
            prompt = [bos_id, *prompt[len(prompt) - max_prompt_length + 1 :]]
        else:
            prompt = prompt[len(prompt) - max_prompt_length :]
    if max_length is None:
        return prompt, chosen, rejected, truncated
    if len(prompt) >= max_length:
        return None  # not one completion token would fit
    room = max_length - len(prompt)
    truncated = truncated or len(chosen) > room or len(rejected) > room
    return prompt, chosen[:room], rejected[:room], truncated


def tokenize_rows(
    rows: Sequence[dict],
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    truncation_mode: str = "keep_start",
    chat_template: str | None = None,
) -> tuple[list[PreferencePair], TokenizeStats]:
    """Tokenize normalized rows (from `load_splits`) into pairs, cutting them to length.

    Pairs whose prompt fills `max_length` are dropped and pairs with chosen == rejected
    skipped (both counted, with a warning). Raises `DataError` listing every row that cannot
    be tokenized, or when no pair is left.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(
            f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}"
        )
    enc = _Encoder(tokenizer, chat_template)
    _check_template(rows, enc)
    stats = TokenizeStats(
        n_rows=len(rows), max_length=max_length, max_prompt_length=max_prompt_length
    )
    pairs, problems, identical = [], [], []
    for row in rows:
        try:
            prompt_ids, chosen_ids, rejected_ids, merged = tokenize_pair(row, enc)
        except (ValueError, TypeError, KeyError, TemplateError) as e:  # bad row or template
            problems.append(f"{row['source']}: {str(e).splitlines()[0] or type(e).__name__}")
            continue
        stats.n_boundary_merged += merged > 0
        stats.prompt_lengths.append(len(prompt_ids))
        stats.chosen_lengths.append(len(chosen_ids))
        stats.rejected_lengths.append(len(rejected_ids))
        cut = truncate_pair(
            prompt_ids,
            chosen_ids,
            rejected_ids,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=truncation_mode,
            bos_id=enc.bos_id,
        )
        if cut is None:
            stats.n_dropped += 1
        elif cut[1] == cut[2]:
            identical.append(row["source"])
        else:
            stats.n_truncated += cut[3]
            pairs.append(PreferencePair(*cut[:3], row["source"], row["prompt"], cut[3]))
    if problems:
        raise DataError(capped(problems, "the data"))
    stats.n_pairs, stats.n_identical = len(pairs), len(identical)
    if identical:
        warnings.warn(
            f"skipped {len(identical)} pairs whose chosen and rejected are the same tokens "
            f"(first: {', '.join(identical[:3])})",
            stacklevel=2,
        )
    if rows and not pairs:
        fix = "raise --max-length" if stats.n_dropped else "check the chosen/rejected fields"
        raise DataError(f"no pairs left to train on: {stats}; {fix}")
    return pairs, stats


def _check_template(rows: Sequence[dict], enc: _Encoder) -> None:
    chat = next((r for r in rows if isinstance(r["prompt"], list)), None)
    if chat is not None and not enc.has_template:
        raise DataError(
            f"{chat['source']}: conversational rows (lists of messages) need a chat template "
            "and this tokenizer has none; pass --chat-template chatml, a template file, or "
            "the template text"
        )


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One micro-batch of B pairs; shapes in the module docstring."""

    tokens: mx.array
    mask: mx.array
    positions: mx.array
    targets: mx.array
    target_mask: mx.array
    ref_chosen: mx.array | None
    ref_rejected: mx.array | None
    index: np.ndarray
    n_tokens: int  # non-padding tokens, for tokens/s

    @property
    def size(self) -> int:
        return len(self.index)


@dataclass
class Update:
    """This rank's micro-batches for one optimizer update (`step` counts from 0)."""

    step: int
    epoch: int
    micro_batches: list[Batch]


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


def collate(
    pairs: Sequence[PreferencePair],
    *,
    index: np.ndarray | None = None,
    ref_chosen: np.ndarray | None = None,
    ref_rejected: np.ndarray | None = None,
    pad_to: int = 32,
) -> Batch:
    """Stack B pairs into a `Batch`: chosen rows first, then rejected rows."""
    rows = [p.prompt_ids + p.chosen_ids for p in pairs]
    rows += [p.prompt_ids + p.rejected_ids for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    n_rows = len(rows)
    T = _round_up(max(map(len, rows)), pad_to)
    C = _round_up(max(len(r) - s for r, s in zip(rows, starts, strict=True)), pad_to)
    tokens = np.zeros((n_rows, T), np.int32)
    mask = np.zeros((n_rows, T - 1), np.float32)
    positions = np.zeros((n_rows, C), np.int32)
    targets = np.zeros((n_rows, C), np.int32)
    target_mask = np.zeros((n_rows, C), np.float32)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        n = len(row) - start  # completion tokens; the logit at t scores token t + 1
        tokens[i, : len(row)] = row
        mask[i, start - 1 : len(row) - 1] = 1.0
        positions[i, :n] = np.arange(start - 1, len(row) - 1)
        targets[i, :n] = row[start:]
        target_mask[i, :n] = 1.0

    def ref(values):
        return None if values is None else mx.array(np.asarray(values, np.float32))

    return Batch(
        tokens=mx.array(tokens),
        mask=mx.array(mask),
        positions=mx.array(positions),
        targets=mx.array(targets),
        target_mask=mx.array(target_mask),
        ref_chosen=ref(ref_chosen),
        ref_rejected=ref(ref_rejected),
        index=np.arange(len(pairs)) if index is None else np.asarray(index),
        n_tokens=sum(map(len, rows)),
    )


def epoch_plan(lengths: np.ndarray, global_size: int, epoch: int, seed: int) -> np.ndarray:
    """Pair indices of one epoch as (updates, global_size), in the order they are used.

    An epoch has `N // global_size` updates. The `N % global_size` pairs left out rotate
    through a fixed seeded permutation, so every pair is left out equally often over epochs.
    The pairs used are sorted by length (random tie-break) and cut into consecutive groups,
    so an update holds pairs of similar length; update order is a permutation seeded by
    (seed, epoch).
    """
    n = len(lengths)
    n_updates, n_left = divmod(n, global_size)
    used = np.ones(n, dtype=bool)
    if n_left:
        rotation = np.random.default_rng(seed).permutation(n)
        used[rotation[(epoch * n_left + np.arange(n_left)) % n]] = False
    idx = np.flatnonzero(used)
    rng = np.random.default_rng((seed, epoch))
    idx = idx[np.lexsort((rng.random(len(idx)), lengths[idx]))]
    return idx.reshape(n_updates, global_size)[rng.permutation(n_updates)]


def iterate_batches(
    pairs: Sequence[PreferencePair],
    batch_size: int,
    *,
    grad_accumulation_steps: int = 1,
    seed: int = 0,
    start_step: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pad_to: int = 32,
    ref_chosen: np.ndarray | None = None,
    ref_rejected: np.ndarray | None = None,
    loop: bool = True,
) -> Iterator[Update]:
    """Yield one `Update` per optimizer step, forever (`loop=True`) or for one pass.

    Training (`loop=True`): a global update is `batch_size * grad_accumulation_steps *
    world_size` pairs of similar length (see `epoch_plan`); rank r takes micro-batches
    `r*A .. r*A+A-1` of it. Every pair used in an epoch is used exactly once; update k of the
    run is the same whatever `start_step` the iteration began at, for exact resumes.

    Evaluation (`loop=False`): pairs in length order, no shuffling, the last batch partial;
    one micro-batch per update (`grad_accumulation_steps` unused). Every rank gets the same
    number of updates; at the very end a rank may get one with no micro-batches.
    """
    if batch_size < 1 or grad_accumulation_steps < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1, grad_accumulation_steps >= 1 and 0 <= rank < world_size; "
            f"got {batch_size}, {grad_accumulation_steps}, rank {rank} of {world_size}"
        )
    for name, values in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if values is not None and len(values) != len(pairs):
            raise ValueError(f"{name} has {len(values)} values for {len(pairs)} pairs")
    refs = [None if v is None else np.asarray(v, np.float32) for v in (ref_chosen, ref_rejected)]
    lengths = np.array(
        [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    )

    def batch(idx: np.ndarray) -> Batch:
        return collate(
            [pairs[i] for i in idx],
            index=idx,
            ref_chosen=None if refs[0] is None else refs[0][idx],
            ref_rejected=None if refs[1] is None else refs[1][idx],
            pad_to=pad_to,
        )

    if not loop:
        yield from _one_pass(lengths, batch, batch_size, start_step, rank, world_size)
        return
    global_size = batch_size * grad_accumulation_steps * world_size
    if len(pairs) < global_size:
        raise DataError(
            f"the dataset has {len(pairs)} pairs but one update needs batch_size x "
            f"grad_accumulation_steps x world_size = {batch_size} x {grad_accumulation_steps} x "
            f"{world_size} = {global_size}; lower --batch-size or add data"
        )
    n_updates = len(pairs) // global_size
    step = start_step
    while True:
        epoch, first = divmod(step, n_updates)
        plan = epoch_plan(lengths, global_size, epoch, seed)
        plan = plan.reshape(n_updates, world_size, grad_accumulation_steps, batch_size)
        for groups in plan[first:, rank]:
            yield Update(step, epoch, [batch(g) for g in groups])
            step += 1


def _one_pass(lengths, batch, batch_size, start_step, rank, world_size) -> Iterator[Update]:
    order = np.argsort(lengths, kind="stable")
    per_update = batch_size * world_size
    for step, start in enumerate(range(0, len(order), per_update)):
        if step >= start_step:
            mine = np.array_split(order[start : start + per_update], world_size)[rank]
            yield Update(step, 0, [batch(mine)] if len(mine) else [])


# ---------------------------------------------------------------------------------------------
# Report for `mlx_dpo data check`


def dataset_stats(splits: dict[str, list[PreferencePair]], stats: dict[str, TokenizeStats]) -> str:
    """A human-readable report: pairs per split, what truncation did, token-length percentiles
    (before truncation) of prompts and chosen/rejected completions."""
    lines = ["split   rows   pairs  truncated  dropped  identical  merged-boundary"]
    for name, st in stats.items():
        lines.append(
            f"{name:<6} {st.n_rows:>5} {len(splits.get(name, [])):>7} {st.n_truncated:>10} "
            f"{st.n_dropped:>8} {st.n_identical:>10} {st.n_boundary_merged:>16}"
        )
    any_stats = next(iter(stats.values()), None)
    if any_stats is not None:
        lines.append(
            f"(truncated/dropped at max_length={any_stats.max_length}, "
            f"max_prompt_length={any_stats.max_prompt_length}; dropped = prompt >= max_length)"
        )
    lines += ["", "tokens before truncation        p50      p90      p99      max"]
    for name, st in stats.items():
        for part, values in (
            ("prompt", st.prompt_lengths),
            ("chosen", st.chosen_lengths),
            ("rejected", st.rejected_lengths),
        ):
            if values:
                p50, p90, p99 = np.percentile(values, [50, 90, 99])
                lines.append(
                    f"{name + ' ' + part:<28} {p50:>7.0f} {p90:>8.0f} {p99:>8.0f} {max(values):>8}"
                )
    return "\n".join(lines)
