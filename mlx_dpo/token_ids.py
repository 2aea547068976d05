"""Texts -> token ids exactly as the tokenizer encodes them, fast: `RowEncoder` encodes the
(prompt, chosen row, rejected row) texts of many rows at a time, and `encode_chunks` spreads
chunks of rows over worker processes (see docs/data.md, "Speed")."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import chain, repeat

import numpy as np

from mlx_dpo.formats import common_prefix_length

WORKERS_ENV = "MLX_DPO_TOKENIZE_WORKERS"  # processes that encode; 1 = in this process
MIN_PARALLEL_ROWS = 4096  # below this, starting workers costs more than it saves


class RowEncoder:
    """Encodes the text a prompt and its two rows share only once: it cuts the text where the
    tokenizer itself always cuts, so each side encodes alone to the same tokens (after a
    special token such as `<|im_start|>`, and, for regex byte-level tokenizers, after a
    newline before a word), and encodes the pieces a word at a time (`WordCache`). Both are
    checked against whole-text encoding on the first rows and turned off for good if they
    ever differ.
    """

    def __init__(self, fast, specials: list[str], bos_id: int | None, slow=None):
        self.fast, self.slow, self.specials, self.bos_id = fast, slow, specials, bos_id
        cuts = [re.escape(t) for t in sorted(filter(None, specials), key=len, reverse=True)]
        if _splits_at_newlines(fast):
            cuts.append(r"\n(?=\S)")  # a newline before a word: always a pre-token boundary
        self.cut = re.compile("|".join(cuts)) if cuts else None
        self.split_checked = 0  # rows whose split encoding matched whole-row encoding
        self.split_ok = self.cut is not None
        self.words = WordCache(fast) if WordCache.fits(fast) else None
        self.words_checked = 0  # texts whose word-at-a-time encoding matched the tokenizer's

    @classmethod
    def for_tokenizer(cls, hf) -> RowEncoder:
        """The encoder of a Hugging Face tokenizer (its Rust one when it is a fast one)."""
        # BOS only where the tokenizer adds one on its own (Llama, Gemma; not Qwen/ChatML).
        bos = getattr(hf, "bos_token_id", None)
        default = hf.encode("a") if bos is not None else []
        bos_id = bos if default and default[0] == bos else None
        fast = getattr(hf, "_tokenizer", None)
        if not hasattr(fast, "encode_batch_fast"):
            fast = None
        added = getattr(hf, "added_tokens_decoder", {}).values()
        specials = [t.content for t in added if t.special]
        return cls(fast, specials, bos_id, slow=None if fast else hf)

    def state(self) -> tuple:
        """What a worker process needs to build the same encoder (fast tokenizers only)."""
        return self.fast.to_str(), self.specials, self.bos_id

    @classmethod
    def from_state(cls, state: tuple) -> RowEncoder:
        from tokenizers import Tokenizer

        text, specials, bos_id = state
        return cls(Tokenizer.from_str(text), specials, bos_id)

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]  # unless the text already starts with it
        return ids

    def encode(self, texts: list[str]) -> list[list[int]]:
        if self.words is None:
            return self.encode_whole(texts)
        out = self.words.encode(texts)
        if self.words_checked < 64:  # checked against the tokenizer itself on the first texts
            n = min(len(texts), 64 - self.words_checked)
            self.words_checked += n
            if out[:n] != self.encode_whole(texts[:n]):
                self.words = None  # this tokenizer's pieces do not end at every space
                return self.encode_whole(texts)
        return out

    def encode_whole(self, texts: list[str]) -> list[list[int]]:
        # Templates write their own special tokens (BOS included), as HF tokenizes them.
        if self.fast is not None:
            return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]
        return [list(self.slow.encode(t, add_special_tokens=False)) for t in texts]

    def split_point(self, prompt: str, rows: tuple[str, str]) -> int:
        """The last place in the text the prompt and both rows share where each side can be
        encoded alone (after a special token, or a newline before a word); 0 when none."""
        if not self.split_ok:
            return 0
        chosen, rejected = rows
        shared = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        # Search the chosen row one character past the shared text, so that a newline that
        # ends the prompt is seen with the answer's first character after it.
        ends = [m.end() for m in self.cut.finditer(chosen, 0, shared + 1) if m.end() <= shared]
        for s in reversed(ends):
            after = rejected[s : s + 1]
            if s < shared or chosen[s - 1] != "\n" or (after and not after.isspace()):
                return s
        return 0

    def encode_rows(self, texts: list[tuple[str, str, str]], chat: list[bool]) -> list[tuple]:
        """(prompt_ids, chosen_row_ids, rejected_row_ids) of each (prompt, chosen row,
        rejected row) text triple; chat rows get no BOS (their template writes it)."""
        cuts = [self.split_point(t[0], t[1:]) for t in texts]
        pieces = []
        for (prompt, chosen, rejected), s in zip(texts, cuts, strict=True):
            pieces += [prompt[:s], prompt[s:], chosen[s:], rejected[s:]]
        ids = self.encode(pieces)
        raw = []
        for i in range(len(texts)):
            head, prompt, chosen, rejected = ids[4 * i : 4 * i + 4]
            raw.append((head + prompt, head + chosen, head + rejected))
        if self.split_ok and self.split_checked < 16 and any(cuts):
            self._check_split(texts, cuts, raw)
            if not self.split_ok:
                return self.encode_rows(texts, chat)
        return [r if c else tuple(map(self.with_bos, r)) for r, c in zip(raw, chat, strict=True)]

    def _check_split(self, texts, cuts, out) -> None:
        for text, s, triple in zip(texts, cuts, out, strict=True):
            if s and self.split_checked < 16:
                self.split_checked += 1
                if self.encode_whole(list(text)) != list(triple):
                    self.split_ok = False  # this tokenizer does not encode segments alone
                    return


def _splits_at_newlines(fast) -> bool:
    """Whether a tokenizer is a regex byte-level one (GPT-2, Llama 3, Qwen, ...): no normalizer
    that sees across the text (NFC does not: nothing composes with a space or a newline), and
    a pre-tokenizer that cuts before a word after a newline."""
    if fast is None or not _local_normalizer(fast.normalizer):
        return False
    try:
        state = json.loads(fast.pre_tokenizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    parts = state.get("pretokenizers", [state])
    return any(p.get("type") == "ByteLevel" and p.get("use_regex") for p in parts) or (
        any(p.get("type") == "Split" for p in parts)
        and any(p.get("type") == "ByteLevel" for p in parts)
    )


def _local_normalizer(normalizer) -> bool:
    if normalizer is None:
        return True
    try:
        state = json.loads(normalizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    return all(n.get("type") == "NFC" for n in state.get("normalizers", [state]))


class WordCache:
    """Encodes texts a word at a time, each distinct word once.

    A regex byte-level tokenizer (GPT-2, Llama 3, Qwen) spends most of its time in its
    pre-tokenizer's regular expression, and each of their patterns ends a piece at a space
    that follows a non-space and precedes one (the next piece starts with that space). So a
    text cut at such spaces encodes word by word to exactly its own tokens, and 30M tokens of
    preference data hold some 100k distinct words. A text with a space beside other
    whitespace (indented code, double spaces) is encoded whole. `RowEncoder` checks the
    result against the tokenizer on the first texts and stops using the cache if they differ.

    Each word the cache has seen is an entry: its tokens are `flat[start:start + size]`, and
    `edge` says whether it starts (1) or ends (2) with whitespace, or is empty (4).
    """

    LIMIT = 1 << 24  # tokens kept; the next call starts the cache over beyond it

    def __init__(self, fast):
        self.fast = fast
        self.later: dict[str, int] = {}  # word -> entry of " word" (any word but a text's first)
        self.first: dict[str, int] = {}  # word -> entry of "word" (a text's first word)
        self.flat = np.zeros(1 << 16, np.int32)
        self.start, self.size, self.edge = (np.zeros(1 << 12, np.int64) for _ in range(3))
        self.n_entries = self.n_tokens = 0
        self.n_whole = 0  # texts encoded whole (a space beside other whitespace)

    @staticmethod
    def fits(fast) -> bool:
        """Regex byte-level, and no added token that spans or strips a space."""
        if not _splits_at_newlines(fast):
            return False
        added = fast.get_added_tokens_decoder().values()
        return not any(" " in t.content or t.lstrip or t.rstrip for t in added)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        if self.n_tokens > self.LIMIT:  # start over between calls: a call's entries stay valid
            self.later.clear()
            self.first.clear()
            self.n_entries = self.n_tokens = 0
        words = [t.split(" ") for t in texts]
        counts = np.fromiter(map(len, words), np.int64, len(words))
        firsts = np.cumsum(counts) - counts
        entries = self._entries(self.later, list(chain.from_iterable(words)), " ")
        entries[firsts] = self._entries(self.first, [w[0] for w in words], "")
        # A cut is unsure where the word after it starts, or the one before ends, with
        # whitespace, or at an empty word inside the text (two spaces): such texts are
        # encoded whole. A leading or trailing space is a sure cut.
        edge = self.edge[entries]
        inner = np.ones(len(entries), bool)
        lasts = firsts + counts - 1
        starts_ws, ends_ws = (edge & 1).astype(bool), (edge & 2).astype(bool)
        starts_ws[firsts] = ends_ws[lasts] = inner[firsts] = inner[lasts] = False
        unsure = starts_ws | ends_ws | (inner & (edge & 4).astype(bool))
        owner = np.repeat(np.arange(len(texts)), counts)
        crowded = np.unique(owner[unsure]).tolist()
        n = self.size[entries]
        ends = np.cumsum(n)
        gather = np.arange(int(ends[-1]) if len(ends) else 0)
        gather += np.repeat(self.start[entries] - (ends - n), n)
        tokens = self.flat[gather].tolist()
        text_ends = ends[lasts].tolist()
        out = [tokens[a:b] for a, b in zip([0, *text_ends[:-1]], text_ends, strict=True)]
        self.n_whole += len(crowded)
        for i, ids in zip(crowded, self._encode([texts[i] for i in crowded]), strict=True):
            out[i] = ids
        return out

    def _entries(self, table: dict[str, int], words: list[str], prefix: str) -> np.ndarray:
        entries = np.fromiter(map(table.get, words, repeat(-1)), np.int64, len(words))
        missing = np.flatnonzero(entries < 0)
        if len(missing):
            new = list(dict.fromkeys(words[i] for i in missing.tolist()))
            self._learn(table, new, prefix)
            entries[missing] = [table[words[i]] for i in missing.tolist()]
        return entries

    def _learn(self, table: dict[str, int], words: list[str], prefix: str) -> None:
        ids = self._encode([prefix + w for w in words])
        sizes = np.fromiter(map(len, ids), np.int64, len(ids))
        e, t = self.n_entries, self.n_tokens
        self.start = _room(self.start, e + len(words))
        self.size = _room(self.size, e + len(words))
        self.edge = _room(self.edge, e + len(words))
        self.flat = _room(self.flat, t + int(sizes.sum()))
        self.size[e : e + len(words)] = sizes
        self.start[e : e + len(words)] = t + np.cumsum(sizes) - sizes
        self.edge[e : e + len(words)] = [
            w[0].isspace() | (w[-1].isspace() << 1) if w else 4 for w in words
        ]
        self.flat[t : t + int(sizes.sum())] = np.fromiter(
            chain.from_iterable(ids), np.int32, int(sizes.sum())
        )
        table.update(zip(words, range(e, e + len(words)), strict=True))
        self.n_entries, self.n_tokens = e + len(words), t + int(sizes.sum())

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]


def _room(array: np.ndarray, n: int) -> np.ndarray:
    """`array` with room for `n` items (doubling, so appends cost O(1) each on average)."""
    if n <= len(array):
        return array
    grown = np.zeros(max(n, 2 * len(array)), array.dtype)
    grown[: len(array)] = array
    return grown


def workers(n_rows: int) -> int:
    """Processes to encode `n_rows` rows with: the environment's choice, else one per core
    for large data sets (at most 8), else 1 (in this process)."""
    given = os.environ.get(WORKERS_ENV, "").strip()
    if given:
        return max(1, int(given))
    if n_rows < MIN_PARALLEL_ROWS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(8, cores or 1))


def encode_chunks(
    row_encoder: RowEncoder, chunks: Iterable[tuple[list, list[bool]]], n_workers: int
) -> Iterator[list[tuple]]:
    """`row_encoder.encode_rows(texts, chat)` of each chunk, in order: in this process, or by
    `n_workers` fresh worker processes (spawned, not forked: MLX's threads may be running)
    while this one renders the next chunks."""
    if n_workers <= 1 or row_encoder.fast is None:
        for texts, chat in chunks:
            yield row_encoder.encode_rows(texts, chat)
        return
    pool = ProcessPoolExecutor(
        n_workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker,
        initargs=(row_encoder.state(),),
    )
    pending: deque = deque()
    try:
        for texts, chat in chunks:
            pending.append(pool.submit(_encode_in_worker, texts, chat))
            if len(pending) > 2 * n_workers:  # bounded: texts in flight, not the data set
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=not pending, cancel_futures=True)


_WORKER: RowEncoder | None = None


def _start_worker(state: tuple) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER = RowEncoder.from_state(state)


def _encode_in_worker(texts: list, chat: list[bool]) -> list[tuple]:
    return _WORKER.encode_rows(texts, chat)
