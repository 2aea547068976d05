"""Word-at-a-time encoding and the worker processes give exactly the tokenizer's own ids."""

from __future__ import annotations

import json
import random

import pytest
from mlx_lm.utils import load_tokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mlx_dpo import token_ids
from mlx_dpo.data import tokenize_rows
from mlx_dpo.token_ids import RowEncoder, WordCache

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# The pre-tokenizer patterns of Llama 3 and Qwen2 (GPT-2's is ByteLevel's own).
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")

WORDS = (
    "the of and to a in is you that it he was for on are as with his they I at be this have "
    "from don't it's we'll café naïve 東京 日本語 😀 🚀 x=1 print(\"hi\") 12345 3.14 -- ... "
    "e\u0301 A\u030a ﬁne \u00a0nbsp\u00a0 end.\n\nNext <|im_end|> <|im_start|>user"
).split(" ")
GAPS = [" "] * 12 + ["  ", "\n", "\n ", " \n", "\t", "\n\n", "   ", "\n  - ", "\r\n", "\u00a0"]
PROSE = [" "] * 30 + ["\n", "\n\n", ", ", "\n- "]


def texts(n: int, seed: int = 0, gaps: list[str] = GAPS, words: list[str] = WORDS) -> list[str]:
    """Random texts built to hit every kind of cut: spaces beside other whitespace,
    leading/trailing spaces, combining marks, unspaced scripts, special tokens."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "word", " word", "word ", "a  b", "\n", "<|im_end|>"]
    for _ in range(n):
        k = rng.randrange(1, 40)
        parts = [rng.choice(words) + rng.choice(gaps) for _ in range(k)]
        out.append(rng.choice(["", " ", "\n"]) + "".join(parts)[: rng.randrange(1, 400)])
    return out


def byte_level(split: str | None, nfc: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(400, seed=1), trainer=trainer)
    return tok


@pytest.mark.parametrize(
    "split, nfc",
    [(None, False), (LLAMA3, False), (QWEN2, True)],
    ids=["gpt2", "llama3", "qwen2-nfc"],
)
def test_word_cache_encodes_exactly_like_the_tokenizer(split, nfc):
    tok = byte_level(split, nfc)
    assert WordCache.fits(tok)  # these are the tokenizers it is for
    cache = WordCache(tok)
    for sample in (texts(600, seed=2), texts(600, seed=3, gaps=PROSE, words=WORDS[:-8])):
        expected = [e.ids for e in tok.encode_batch(sample, add_special_tokens=False)]
        cache.n_whole = 0
        assert cache.encode(sample) == expected
        assert cache.encode(sample[::-1]) == expected[::-1]  # now from the cache
    assert len(cache.later) > 100 and cache.n_whole < len(sample) / 2  # prose used the cache


def test_a_full_cache_starts_over_without_mixing_up_words():
    tok = byte_level(LLAMA3)
    cache = WordCache(tok)
    cache.LIMIT = 200  # tokens: every call below overflows it
    for seed in range(4):
        sample = texts(80, seed=20 + seed, gaps=PROSE, words=WORDS[:-8])
        expected = [e.ids for e in tok.encode_batch(sample, add_special_tokens=False)]
        assert cache.encode(sample) == expected
        assert cache.n_tokens > cache.LIMIT
    assert cache.encode([]) == []


def test_a_tokenizer_whose_pieces_cross_spaces_is_caught_and_encoded_whole():
    lines = byte_level(r"[^\n]+\n?")  # one piece per line: merges learned across spaces
    sample = texts(200, seed=3)
    expected = [e.ids for e in lines.encode_batch(sample, add_special_tokens=False)]
    assert WordCache(lines).encode(sample) != expected  # so the check below is needed
    enc = RowEncoder(lines, SPECIALS, None)
    assert enc.encode(sample) == expected
    assert enc.words is None


def test_tokenizers_the_cache_is_not_for():
    tok = byte_level(None)
    spm = Tokenizer(models.BPE())
    spm.pre_tokenizer = pre_tokenizers.Metaspace()  # adds "▁" at the start of each text
    assert not WordCache.fits(spm)
    tok.normalizer = normalizers.Lowercase()
    assert not WordCache.fits(tok)


def _rows(n: int) -> list[dict]:
    rng = random.Random(4)
    out = []
    for i, t in enumerate(texts(3 * n, seed=5)[: 3 * n : 3]):
        a, b = rng.choice(WORDS), rng.choice(WORDS) + " x"
        if i % 2:
            row = {"prompt": [{"role": "user", "content": t}]}
            row |= {"chosen": [{"role": "assistant", "content": a}]}
            row |= {"rejected": [{"role": "assistant", "content": b}]}
        else:
            row = {"prompt": t + "\n", "chosen": a, "rejected": b}
        out.append(row | {"source": f"rows.jsonl:{i + 1}"})
    return out


def test_worker_processes_give_the_same_pairs(monkeypatch, tiny_model_path):
    tok = load_tokenizer(tiny_model_path)
    rows = _rows(300)
    monkeypatch.setenv(token_ids.WORKERS_ENV, "1")
    here, here_stats = tokenize_rows(rows, tok, max_length=64, progress=False, chunk=40)
    monkeypatch.setenv(token_ids.WORKERS_ENV, "2")
    spawned, stats = tokenize_rows(rows, tok, max_length=64, progress=False, chunk=40)
    assert [json.dumps(vars(p)) for p in spawned] == [json.dumps(vars(p)) for p in here]
    assert str(stats) == str(here_stats)
    assert [p.source for p in stats.skipped] == [p.source for p in here_stats.skipped]


def test_worker_count(monkeypatch):
    monkeypatch.delenv(token_ids.WORKERS_ENV, raising=False)
    assert token_ids.workers(10) == 1  # small data: no processes to start
    assert 1 <= token_ids.workers(10**6) <= 8
    monkeypatch.setenv(token_ids.WORKERS_ENV, "3")
    assert token_ids.workers(10) == 3


LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}"
    "{% endif %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.mark.parametrize("template", [None, LLAMA3_TEMPLATE], ids=["chatml", "llama3-like"])
def test_direct_render_is_apply_chat_template(tiny_model_path, template):
    from mlx_dpo.encoder import Encoder

    enc = Encoder(load_tokenizer(tiny_model_path), template)
    assert enc.direct is not None
    rng = random.Random(6)
    convs = []
    for t in texts(60, seed=7):
        conv = [{"role": "user", "content": t}, {"role": "assistant", "content": t[::-1]}]
        if rng.random() < 0.3:
            conv.insert(0, {"role": "system", "content": "Be brief. "})
        convs.append(conv)
    for gen in (True, False):
        got = enc.render(convs, gen)
        kwargs = dict(tokenize=False, add_generation_prompt=gen)
        expected = enc.hf.apply_chat_template(convs, chat_template=enc.template, **kwargs)
        assert got == expected
    assert enc.direct is not None and enc.direct.checked == {True: 32, False: 32}


def test_direct_render_that_differs_is_dropped(tiny_model_path):
    from mlx_dpo.encoder import Encoder

    enc = Encoder(load_tokenizer(tiny_model_path), LLAMA3_TEMPLATE)
    enc.direct.context["bos_token"] = "<wrong>"  # as if transformers passed something else
    convs = [[{"role": "user", "content": "hi"}]] * 3
    expected = enc.hf.apply_chat_template(
        convs, chat_template=LLAMA3_TEMPLATE, tokenize=False, add_generation_prompt=True
    )
    assert enc.render(convs, True) == expected
    assert enc.direct is None
