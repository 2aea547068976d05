"""Preference data: rows -> tokenized pairs -> length-bucketed batches.

Reading and checking rows (files, directories, Hub datasets) is in `mlx_dpo.data_sources`
(row formats in `mlx_dpo.formats`), tokenization in `mlx_dpo.tokenization`; their public
names are re-exported here.

Batch shape contract (B pairs per micro-batch; `collate`):

| field         | shape / dtype     | meaning                                                     |
|---------------|-------------------|-------------------------------------------------------------|
| `tokens`      | (2B, T) int32     | rows 0..B-1 prompt+chosen, B..2B-1 prompt+rejected, right-  |
|               |                   | padded with 0; T a multiple of `pad_to`                     |
| `positions`   | (2B, C) int32     | the t whose target `tokens[:, t+1]` is a completion token   |
|               |                   | (EOS included), in order, 0-padded; C a multiple of `pad_to`|
| `targets`     | (2B, C) int32     | `tokens[r, positions + 1]`, 0 in padding                    |
| `target_mask` | (2B, C) float32   | 1 on real completion targets                                |
| `ref_chosen`, | (B,) float32      | reference log-probs summed over each completion, or None    |
| `ref_rejected`|                   |                                                             |
| `index`       | (B,) int          | the pairs' indices in the list given to *_batches           |

With `share_prompt` (mlx_dpo.shared_prompt) a pair is one row: `tokens` (B, T) holds prompt |
chosen | rejected | padding, `positions` still has 2B rows (chosen, then rejected) that index
row r for both answers of pair r, and three more fields say how to run the row (over the
model's inputs `tokens[:, :-1]`, T - 1 of them, indices flat over B x (T - 1) or 2B x L):

| field            | shape / dtype     | meaning                                               |
|------------------|-------------------|-------------------------------------------------------|
| `rope_positions` | (B, T) int32      | each token's position: the rejected answer's restart  |
|                  |                   | at the prompt's length                                |
| `split_index`    | (2B, L) int32     | the inputs that make each answer's own row `prompt +  |
|                  |                   | answer` (chosen rows, then rejected), attention's     |
|                  |                   | rows; L is the two-row layout's input length          |
| `merge_index`    | (B, T - 1) int32  | where each input's attention output is in those rows  |
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlx_dpo.config import TRUNCATION_MODES
from mlx_dpo.data_report import dataset_stats
from mlx_dpo.data_sources import DataError, Splits, load_splits
from mlx_dpo.formats import Problem
from mlx_dpo.tokenization import (
    CHATML,
    PreferencePair,
    TokenizeStats,
    resolve_chat_template,
    tokenize_pair,
    tokenize_rows,
    truncate_pair,
)

__all__ = [
    "CHATML",
    "TRUNCATION_MODES",
    "Batch",
    "DataError",
    "PreferencePair",
    "Problem",
    "Splits",
    "TokenizeStats",
    "Update",
    "collate",
    "dataset_stats",
    "eval_batches",
    "iterate_batches",
    "load_splits",
    "rank_share",
    "resolve_chat_template",
    "tokenize_pair",
    "tokenize_rows",
    "truncate_pair",
]


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """One micro-batch of B pairs; shapes in the module docstring."""

    tokens: mx.array
    positions: mx.array
    targets: mx.array
    target_mask: mx.array
    ref_chosen: mx.array | None
    ref_rejected: mx.array | None
    index: np.ndarray
    n_tokens: int  # non-padding tokens of both rows (the prompt counted twice), for tokens/s
    rope_positions: mx.array | None = None  # the shared-prompt layout's (B, T) int32, else None
    split_index: mx.array | None = None  # the shared-prompt layout's (2B, L) int32, else None
    merge_index: mx.array | None = None  # the shared-prompt layout's (B, T - 1) int32

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
    share_prompt: bool = False,
) -> Batch:
    """Stack B pairs into a `Batch`: chosen rows first, then rejected rows; with `share_prompt`
    one row per pair (`_collate_shared`)."""
    if share_prompt:
        return _collate_shared(pairs, index, ref_chosen, ref_rejected, pad_to)
    rows = [p.prompt_ids + p.chosen_ids for p in pairs]
    rows += [p.prompt_ids + p.rejected_ids for p in pairs]
    starts = [len(p.prompt_ids) for p in pairs] * 2
    n_rows = len(rows)
    T = _round_up(max(map(len, rows)), pad_to)
    C = _round_up(max(len(r) - s for r, s in zip(rows, starts, strict=True)), pad_to)
    tokens = np.zeros((n_rows, T), np.int32)
    positions = np.zeros((n_rows, C), np.int32)
    targets = np.zeros((n_rows, C), np.int32)
    target_mask = np.zeros((n_rows, C), np.float32)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        n = len(row) - start  # completion tokens; the logit at t scores token t + 1
        tokens[i, : len(row)] = row
        positions[i, :n] = np.arange(start - 1, len(row) - 1)
        targets[i, :n] = row[start:]
        target_mask[i, :n] = 1.0

    return _batch(
        (tokens, positions, targets, target_mask), pairs, index, ref_chosen, ref_rejected,
        n_tokens=sum(map(len, rows)),
    )  # fmt: skip


def _batch(arrays, pairs, index, ref_chosen, ref_rejected, **more) -> Batch:
    """A Batch of the numpy (tokens, positions, targets, target_mask) and the rest."""
    tokens, positions, targets, target_mask = (mx.array(a) for a in arrays)
    return Batch(
        tokens=tokens,
        positions=positions,
        targets=targets,
        target_mask=target_mask,
        ref_chosen=_refs(ref_chosen),
        ref_rejected=_refs(ref_rejected),
        index=np.arange(len(pairs)) if index is None else np.asarray(index),
        **more,
    )


def _refs(values) -> mx.array | None:
    return None if values is None else mx.array(np.asarray(values, np.float32))


def _collate_shared(pairs, index, ref_chosen, ref_rejected, pad_to: int) -> Batch:
    """The shared-prompt layout (mlx_dpo.shared_prompt): row r of `tokens` (B, T) is prompt |
    chosen | rejected | 0-padding; `positions` (2B, C) index row r for both pair r (chosen)
    and B + r (rejected), whose first target is scored from the prompt's last token too."""
    B = len(pairs)
    T = _round_up(max(row_length(p, shared=True) for p in pairs), pad_to)
    C = _round_up(max(max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs), pad_to)
    tokens = np.zeros((B, T), np.int32)
    rope_positions = np.zeros((B, T), np.int32)
    positions = np.zeros((2 * B, C), np.int32)
    targets = np.zeros((2 * B, C), np.int32)
    target_mask = np.zeros((2 * B, C), np.float32)
    for r, p in enumerate(pairs):
        P, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        end = P + n_c + n_r
        tokens[r, :end] = p.prompt_ids + p.chosen_ids + p.rejected_ids
        # positions restart after the prompt for the rejected answer, run on into the padding
        rope_positions[r] = np.concatenate([np.arange(P + n_c), np.arange(P, P + T - P - n_c)])
        positions[r, :n_c] = np.arange(P - 1, P + n_c - 1)
        positions[B + r, :n_r] = np.concatenate([[P - 1], np.arange(P + n_c, end - 1)])
        targets[r, :n_c], targets[B + r, :n_r] = p.chosen_ids, p.rejected_ids
        target_mask[r, :n_c], target_mask[B + r, :n_r] = 1.0, 1.0
    return _batch(
        (tokens, positions, targets, target_mask),
        pairs,
        index,
        ref_chosen,
        ref_rejected,
        n_tokens=sum(
            2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs
        ),
        rope_positions=mx.array(rope_positions),
        **_split_and_merge(pairs, T - 1, _round_up(max(map(row_length, pairs)), pad_to) - 1),
    )


def row_length(pair: PreferencePair, shared: bool = False) -> int:
    """Tokens of the pair's longer row `prompt + answer`, or with `shared` of its one row
    `prompt | chosen | rejected`."""
    chosen, rejected = len(pair.chosen_ids), len(pair.rejected_ids)
    return len(pair.prompt_ids) + (chosen + rejected if shared else max(chosen, rejected))


def _split_and_merge(pairs, n: int, L: int) -> dict[str, mx.array]:
    """The shared rows' gathers for attention (module docstring), over n inputs per row. Each
    answer's own row is its inputs in order, then filler (the row's last input: behind every
    real query, so causal attention hides it); a place past L or n (only ever a row's final
    token, whose output nothing reads) is clipped to the last."""
    B = len(pairs)
    split = np.full((2 * B, L), n - 1, np.int32)
    merge = np.zeros((B, n), np.int32)
    t = np.arange(n)
    for r, p in enumerate(pairs):
        P, n_c, n_r = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        end = P + n_c + n_r
        own = (np.arange(P + n_c), np.concatenate([np.arange(P), np.arange(P + n_c, end)]))
        for row, tokens in zip((r, B + r), own, strict=True):
            split[row, : min(len(tokens), L)] = np.minimum(tokens[:L], n - 1)
        split[(r, B + r), :] += r * n
        rejected = (t >= P + n_c) & (t < end)
        place = np.minimum(np.where(rejected, t - n_c, t), L - 1)
        merge[r] = np.where(rejected, B + r, r) * L + np.where(t < end, place, L - 1)
    return {"split_index": mx.array(split), "merge_index": mx.array(merge)}


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
    share_prompt: bool = False,
) -> Iterator[Update]:
    """Training batches: one `Update` per optimizer step, forever.

    A global update is `batch_size * grad_accumulation_steps * world_size` pairs of similar
    length (see `epoch_plan`); this rank takes its `rank_share`, cut into
    `grad_accumulation_steps` micro-batches. Every pair used in an epoch is used exactly once;
    update k of the run is the same whatever `start_step` the iteration began at, for exact
    resumes.
    """
    if grad_accumulation_steps < 1:
        raise ValueError(f"need grad_accumulation_steps >= 1, got {grad_accumulation_steps}")
    batch = _collator(
        pairs, batch_size, rank, world_size, ref_chosen, ref_rejected, pad_to, share_prompt
    )
    global_size = batch_size * grad_accumulation_steps * world_size
    if len(pairs) < global_size:
        raise DataError(
            f"the dataset has {len(pairs)} pairs but one update needs batch_size x "
            f"grad_accumulation_steps x world_size = {batch_size} x {grad_accumulation_steps} x "
            f"{world_size} = {global_size}; lower --batch-size or add data"
        )
    lengths = pair_lengths(pairs)
    n_updates = len(pairs) // global_size
    step = start_step
    while True:
        epoch, first = divmod(step, n_updates)
        for update in epoch_plan(lengths, global_size, epoch, seed)[first:]:
            mine = rank_share(update, rank, world_size)
            yield Update(step, epoch, [batch(g) for g in mine.reshape(-1, batch_size)])
            step += 1


def eval_batches(
    pairs: Sequence[PreferencePair],
    batch_size: int,
    *,
    rank: int = 0,
    world_size: int = 1,
    max_batches: int = -1,
    pad_to: int = 32,
    ref_chosen: np.ndarray | None = None,
    ref_rejected: np.ndarray | None = None,
    share_prompt: bool = False,
) -> Iterator[Batch]:
    """Evaluation batches: one pass over the pairs in length order, no shuffling.

    The first `max_batches * batch_size` pairs (all when negative) in batches of `batch_size`,
    the last one partial; with several ranks, each global batch of `batch_size * world_size`
    pairs is split by `rank_share` as in training, and a rank whose share is empty skips it.
    """
    batch = _collator(
        pairs, batch_size, rank, world_size, ref_chosen, ref_rejected, pad_to, share_prompt
    )
    order = np.argsort(pair_lengths(pairs), kind="stable")
    if max_batches >= 0:
        order = order[: max_batches * batch_size]
    per_global = batch_size * world_size
    for start in range(0, len(order), per_global):
        mine = rank_share(order[start : start + per_global], rank, world_size)
        if len(mine):
            yield batch(mine)


def rank_share(global_batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This rank's pairs of a global batch: the rank-th of `world_size` contiguous pieces (equal
    in training; in evaluation the last global batch may leave the last ranks fewer or none)."""
    return np.array_split(global_batch, world_size)[rank]


def pair_lengths(pairs: Sequence[PreferencePair]) -> np.ndarray:
    """Each pair's longer row: what its padded length in a batch depends on."""
    return np.array([row_length(p) for p in pairs])


def _collator(pairs, batch_size, rank, world_size, ref_chosen, ref_rejected, pad_to, share):
    """Checks the arguments; returns pair indices -> `Batch` (with their reference values)."""
    if batch_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"need batch_size >= 1 and 0 <= rank < world_size; "
            f"got {batch_size}, rank {rank} of {world_size}"
        )
    for name, values in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if values is not None and len(values) != len(pairs):
            raise ValueError(f"{name} has {len(values)} values for {len(pairs)} pairs")
    refs = [None if v is None else np.asarray(v, np.float32) for v in (ref_chosen, ref_rejected)]

    def batch(idx: np.ndarray) -> Batch:
        return collate(
            [pairs[i] for i in idx],
            index=idx,
            ref_chosen=None if refs[0] is None else refs[0][idx],
            ref_rejected=None if refs[1] is None else refs[1][idx],
            pad_to=pad_to,
            share_prompt=share,
        )

    return batch
