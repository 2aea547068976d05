"""Tokenization: normalized rows -> `PreferencePair`s of token ids. Follows TRL 1.16:

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
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from jinja2 import TemplateError

from mlx_dpo import token_ids
from mlx_dpo.data_sources import DataError, capped
from mlx_dpo.encoder import CHATML, Encoder, resolve_chat_template
from mlx_dpo.formats import Problem, common_prefix_length
from mlx_dpo.progress import Progress

__all__ = ["CHATML", "resolve_chat_template", "tokenize_rows", "truncate_pair"]

DROPPED = "prompt fills max_length"  # skip reasons counted by tokenize_rows
IDENTICAL = "chosen == rejected"


@dataclass
class PreferencePair:
    """One tokenized pair; `chosen_ids`/`rejected_ids` are completion tokens only."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str  # "path/train.jsonl:17" or "org/name[train]:row 17"
    prompt: str | list[dict]  # the original prompt (text or messages)
    truncated: bool = False
    margin: float | None = None  # score of chosen - score of rejected, for scored rows


@dataclass
class TokenizeStats:
    """What `tokenize_rows` kept and cut. Lengths are before truncation, per tokenized row."""

    n_rows: int = 0
    n_pairs: int = 0
    n_truncated: int = 0  # kept, but prompt or a completion was cut
    n_dropped: int = 0  # prompt alone >= max_length
    n_identical: int = 0  # chosen == rejected (after truncation): no learning signal
    skipped: list[Problem] = field(default_factory=list, repr=False)  # every row not kept
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
    skip_invalid_rows: bool = False,
    progress: bool = True,
    chunk: int = 512,
) -> tuple[list[PreferencePair], TokenizeStats]:
    """Tokenize normalized rows (from `load_splits`) into pairs, cutting them to length.

    Pairs whose prompt fills `max_length` and pairs with chosen == rejected are skipped and
    counted per reason in `stats.skipped`. Rows that cannot be tokenized (a template error,
    an answer with no tokens) raise one `DataError` listing them, or are skipped too with
    `skip_invalid_rows`. Raises `DataError` when no pair is left. Shows a progress bar on a
    terminal (`progress`) while it works through `chunk` rows at a time.
    """
    enc = Encoder(tokenizer, chat_template)
    _check_template(rows, enc)
    stats = TokenizeStats(
        n_rows=len(rows), max_length=max_length, max_prompt_length=max_prompt_length
    )
    limits = dict(
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        truncation_mode=truncation_mode,
        bos_id=enc.bos_id,
    )
    pairs, problems = [], []
    bar = Progress("tokenizing", len(rows), unit="pairs", enabled=progress and len(rows) > chunk)
    rendered: deque = deque()  # (rows, their ids' places, template problems) of each chunk

    def texts_of_chunks():  # rendered here, while workers encode the chunks before
        for start in range(0, len(rows), chunk):
            part = rows[start : start + chunk]
            texts, good, bad = _render_chunk(part, enc)
            rendered.append((part, good, bad))
            yield [texts[i] for i in good], [isinstance(part[i]["prompt"], list) for i in good]

    with bar:
        n_workers = token_ids.workers(len(rows))
        for encoded in token_ids.encode_chunks(enc.rows, texts_of_chunks(), n_workers):
            part, good, bad = rendered.popleft()
            problems += bad
            for i, ids in zip(good, encoded, strict=True):
                _add_pair(part[i], ids, limits, stats, pairs, problems)
            bar.update(len(part))
    invalid = [p for p in problems if p.structural]
    if invalid and not skip_invalid_rows:
        raise DataError(capped(invalid, "the data"))
    stats.skipped = problems
    stats.n_pairs = len(pairs)
    stats.n_dropped = sum(p.reason == DROPPED for p in problems)
    stats.n_identical = sum(p.reason == IDENTICAL for p in problems)
    if stats.n_identical:
        first = ", ".join(p.source for p in problems if p.reason == IDENTICAL)
        warnings.warn(
            f"skipped {stats.n_identical} pairs whose chosen and rejected are the same tokens "
            f"(first: {', '.join(first.split(', ')[:3])})",
            stacklevel=2,
        )
    if rows and not pairs:
        fix = "raise --max-length" if stats.n_dropped else "check the chosen/rejected fields"
        raise DataError(f"no pairs left to train on: {stats}; {fix}")
    return pairs, stats


def _row_texts(rows: Sequence[dict], enc: Encoder) -> list[tuple[str, str, str] | str]:
    """(prompt, prompt+chosen, prompt+rejected) texts per row, or why a row cannot be rendered."""
    out: list = [None] * len(rows)
    chat = [i for i, r in enumerate(rows) if isinstance(r["prompt"], list)]
    for i, r in enumerate(rows):
        if i not in chat:
            p = r["prompt"]
            out[i] = (p, p + enc.with_eos(r["chosen"]), p + enc.with_eos(r["rejected"]))
    plain = [i for i in chat if not rows[i].get("tools")]
    plain_done: set[int] = set()
    try:  # one call per kind of text for the whole batch
        texts = plain and [
            enc.render([rows[i]["prompt"] for i in plain], True),
            enc.render([rows[i]["prompt"] + rows[i]["chosen"] for i in plain], False),
            enc.render([rows[i]["prompt"] + rows[i]["rejected"] for i in plain], False),
        ]
        for j, i in enumerate(plain):
            out[i] = (texts[0][j], texts[1][j], texts[2][j])
        plain_done = set(plain)
    except (ValueError, TypeError, KeyError, TemplateError):
        pass  # render row by row to name the bad one(s)
    for i in chat:
        if i in plain_done:
            continue
        r, tools = rows[i], rows[i].get("tools")
        try:
            out[i] = (
                enc.render([r["prompt"]], True, tools)[0],
                enc.render([r["prompt"] + r["chosen"]], False, tools)[0],
                enc.render([r["prompt"] + r["rejected"]], False, tools)[0],
            )
        except (ValueError, TypeError, KeyError, TemplateError) as e:  # bad row or template
            out[i] = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    return out


def _render_chunk(rows: Sequence[dict], enc: Encoder) -> tuple[list, list[int], list]:
    """The rows' texts, the places of those that rendered, and a problem for each that did not."""
    texts = _row_texts(rows, enc)
    good = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    bad = [
        Problem(rows[i]["source"], "template error", t)
        for i, t in enumerate(texts)
        if isinstance(t, str)
    ]
    return texts, good, bad


def _add_pair(row: dict, ids: tuple, limits: dict, stats: TokenizeStats, pairs, problems) -> None:
    prompt_ids, full_chosen, full_rejected = ids
    # The boundary is where the prompt and both rows stop agreeing (TRL's common prefix).
    k = min(
        common_prefix_length(prompt_ids, full_chosen),
        common_prefix_length(prompt_ids, full_rejected),
    )
    source = row["source"]
    if k == 0:
        message = (
            "the prompt has no tokens of its own (it merges into the answer); end the prompt "
            "with a space or newline"
        )
        problems.append(Problem(source, "prompt merges into answer", message))
        return
    for name, full in (("chosen", full_chosen), ("rejected", full_rejected)):
        if len(full) == k:
            message = f"the {name} completion has no tokens after the prompt (no end token either)"
            problems.append(Problem(source, "answer has no tokens", message))
            return
    chosen_ids, rejected_ids = full_chosen[k:], full_rejected[k:]
    stats.n_boundary_merged += len(prompt_ids) > k
    stats.prompt_lengths.append(k)
    stats.chosen_lengths.append(len(chosen_ids))
    stats.rejected_lengths.append(len(rejected_ids))
    cut = truncate_pair(full_chosen[:k], chosen_ids, rejected_ids, **limits)
    if cut is None:
        message = f"the prompt alone fills max_length={limits['max_length']}"
        problems.append(Problem(source, DROPPED, message, structural=False))
    elif cut[1] == cut[2]:
        message = "chosen and rejected are the same tokens"
        problems.append(Problem(source, IDENTICAL, message, structural=False))
    else:
        stats.n_truncated += cut[3]
        pair = PreferencePair(*cut[:3], source, row["prompt"], cut[3], row.get("margin"))
        pairs.append(pair)


def tokenize_pair(row: dict, enc: Encoder) -> tuple[list[int], list[int], list[int], int]:
    """(prompt_ids, chosen_ids, rejected_ids, merged) of one row before truncation; raises
    ValueError. The single-row form of `tokenize_rows`, for tests and tools."""
    texts, good, problems = _render_chunk([{**row, "source": "row"}], enc)
    if problems:
        raise ValueError(problems[0].message)
    (ids,) = enc.rows.encode_rows(texts, [isinstance(row["prompt"], list)])
    stats, pairs = TokenizeStats(), []
    limits = dict(
        max_length=None, max_prompt_length=None, truncation_mode="keep_start", bos_id=None
    )
    _add_pair({**row, "source": "row"}, ids, limits, stats, pairs, problems)
    if problems:
        raise ValueError(problems[0].message)
    (pair,) = pairs
    return pair.prompt_ids, pair.chosen_ids, pair.rejected_ids, stats.n_boundary_merged


def _check_template(rows: Sequence[dict], enc: Encoder) -> None:
    chat = next((r for r in rows if isinstance(r["prompt"], list)), None)
    if chat is not None and not enc.has_template:
        raise DataError(
            f"{chat['source']}: conversational rows (lists of messages) need a chat template "
            "and this tokenizer has none; pass --chat-template chatml, a template file, or "
            "the template text (HH transcripts: --no-hh-as-messages keeps them as text)"
        )
