"""Real-world preference formats, each detected from its rows with no flag, on the example files
in examples/data and on small fixtures in the same shapes; degenerate rows (empty answers,
nothing to learn) and invalid rows skipped with their reasons; compressed files."""

from __future__ import annotations

import bz2
import gzip
import json
import warnings
from pathlib import Path

import pyarrow as pa
import pytest
from mlx_lm.utils import load_tokenizer

from mlx_dpo.data import DataError, load_splits, tokenize_rows
from mlx_dpo.data_sources import write_skipped
from mlx_dpo.formats import detect, parse_hh

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"
SYSTEM = "You are a helpful assistant. Answer briefly."


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, **kw) -> dict:
    return load_splits(str(path), valid_fraction=0, **kw)


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


def chatml(*messages, generation=False) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n" * generation


# ---------------------------------------------------------------------------------------------
# One example file per format: detected, normalized as the format means, tokenized


@pytest.mark.parametrize(
    ("name", "fmt", "first"),
    [
        ("openai.jsonl", "openai", {"prompt": [user("What is the boiling point of water at sea level?")], "chosen": assistant("100 degrees Celsius."), "rejected": assistant("About 50 degrees.")}),
        ("sharegpt.json", "sharegpt", {"prompt": [user("What is the boiling point of water at sea level?")], "chosen": assistant("100 degrees Celsius."), "rejected": assistant("About 50 degrees.")}),
        ("orca.jsonl", "orca", {"prompt": [user("What is the boiling point of water at sea level?")], "chosen": assistant("100 degrees Celsius."), "rejected": assistant("About 50 degrees.")}),
        ("hh.jsonl.gz", "hh", {"prompt": [user("What is the boiling point of water at sea level?")], "chosen": assistant("100 degrees Celsius."), "rejected": assistant("About 50 degrees.")}),
        ("ultrafeedback.jsonl", "conversational", {"prompt": [user("What is the boiling point of water at sea level?")], "chosen": assistant("100 degrees Celsius."), "rejected": assistant("About 50 degrees."), "margin": 0.0}),
    ],
)  # fmt: skip
def test_example_file_of_each_format(tok, name, fmt, first):
    rows = load(EXAMPLES / name)
    assert set(rows.formats) == {fmt} and sum(rows.formats.values()) == 12
    got = {k: v for k, v in rows["train"][0].items() if k != "source"}
    assert got == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no identical pairs in the examples
        pairs, stats = tokenize_rows(rows["train"], tok)
    assert stats.n_pairs == len(rows["train"]) and all(p.chosen_ids for p in pairs)


def test_openai_system_message_and_tools(tmp_path):
    tools = [{"type": "function", "function": {"name": "now", "parameters": {}}}]
    row = {
        "input": {"messages": [{"role": "system", "content": SYSTEM}, user("Hi")], "tools": tools},
        "preferred_output": [
            {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}
        ],
        "non_preferred_output": [{"role": "assistant", "content": "Go away."}],
    }
    (got,) = load(write_jsonl(tmp_path / "o.jsonl", [row]))["train"]
    assert got["prompt"] == [{"role": "system", "content": SYSTEM}, user("Hi")]
    assert got["chosen"] == assistant("Hello.")  # content parts joined
    assert got["tools"] == tools


def test_sharegpt_system_and_multi_turn(tok, tmp_path):
    rows = json.loads((EXAMPLES / "sharegpt.json").read_text())
    out = load(EXAMPLES / "sharegpt.json")["train"]
    # row 1 has a system prompt; row 2 an earlier exchange; "gpt" -> assistant, "human" -> user
    assert out[1]["prompt"] == [
        {"role": "system", "content": SYSTEM},
        user(rows[1]["conversations"][0]["value"]),
    ]
    assert out[2]["prompt"][:2] == [user("Hi!"), {"role": "assistant", "content": "Hello!"}]
    pairs, _ = tokenize_rows(out[1:2], tok)
    # the rendered prompt is ChatML with the system turn first and the generation prompt last
    assert tok.decode(pairs[0].prompt_ids) == chatml(*out[1]["prompt"], generation=True)
    assert tok.decode(pairs[0].chosen_ids) == rows[1]["chosen"]["value"] + "<|im_end|>\n"


def test_orca_system_becomes_a_system_message_only_when_set():
    out = load(EXAMPLES / "orca.jsonl")["train"]
    assert [m["role"] for m in out[0]["prompt"]] == ["user"]  # empty system
    assert out[1]["prompt"][0] == {"role": "system", "content": SYSTEM}


# ---------------------------------------------------------------------------------------------
# Anthropic HH transcripts


def test_hh_transcripts_parse_into_turns():
    text = "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye\n\nAssistant:"
    assert parse_hh(text) == [
        user("Hi"), {"role": "assistant", "content": "Hello!"}, user("Bye"), *assistant("")
    ]  # fmt: skip


def test_hh_empty_answer_as_messages_is_scored_on_its_end_of_turn(tok):
    rows = load(EXAMPLES / "hh.jsonl.gz")  # every row is a transcript: messages automatically
    assert rows.hh_messages and "as chat messages" in rows.format_line()
    empty = rows["train"][5]
    assert empty["chosen"] == assistant("") and empty["rejected"] == assistant("A hundred.")
    pairs, _ = tokenize_rows([empty], tok)
    assert tok.decode(pairs[0].chosen_ids) == "<|im_end|>\n"  # TRL: just the end of the turn
    assert tok.decode(pairs[0].rejected_ids) == "A hundred.<|im_end|>\n"


def test_hh_as_text_keeps_the_transcript_and_an_empty_answer_is_its_eos(tok):
    rows = load(EXAMPLES / "hh.jsonl.gz", hh_as_messages=False)
    assert not rows.hh_messages and "as plain text" in rows.format_line()
    empty = rows["train"][5]
    # the implicit prompt: the common prefix; the space before the answers goes with them
    assert empty["prompt"] == "\n\nHuman: How many minutes are in an hour?\n\nAssistant:"
    assert (empty["chosen"], empty["rejected"]) == ("", " A hundred.")
    pairs, _ = tokenize_rows([empty], tok)
    assert tok.decode(pairs[0].chosen_ids) == "<|im_end|>"  # EOS alone
    assert tok.decode(pairs[0].rejected_ids) == " A hundred.<|im_end|>"


def test_hh_auto_only_when_every_row_is_a_transcript(tmp_path):
    hh = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: B"}
    other = {"chosen": "Q: x A: yes", "rejected": "Q: x A: no"}
    mixed = load(write_jsonl(tmp_path / "m.jsonl", [hh, other]))
    assert not mixed.hh_messages and mixed["train"][0]["prompt"] == "\n\nHuman: Q\n\nAssistant:"
    forced = load(write_jsonl(tmp_path / "f.jsonl", [hh, other]), hh_as_messages=True)
    assert forced["train"][0]["prompt"] == [user("Q")]
    assert forced["train"][1]["prompt"] == "Q: x A:"  # not a transcript: read as it is


def test_hh_transcripts_with_different_prompts_are_invalid(tmp_path):
    row = {"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: R\n\nAssistant: B"}
    with pytest.raises(DataError, match=r"f.jsonl:1: the chosen and rejected transcripts differ"):
        load(write_jsonl(tmp_path / "f.jsonl", [row]))


# ---------------------------------------------------------------------------------------------
# Scores, nested fields, compressed files


def test_min_score_margin_filters_pairs_and_keeps_the_margin(tok):
    rows = load(EXAMPLES / "ultrafeedback.jsonl")
    # score_chosen = 8 + i % 3, score_rejected = 8 - i % 5 (examples/data/make_formats.py)
    margins = [(8 + i % 3) - (8 - i % 5) for i in range(12)]
    assert [r["margin"] for r in rows["train"]] == margins
    kept = load(EXAMPLES / "ultrafeedback.jsonl", min_score_margin=3)
    assert len(kept["train"]) == sum(m >= 3 for m in margins)
    assert {p.reason for p in kept.skipped} == {"score margin below minimum"}
    assert len(kept.skipped) == sum(m < 3 for m in margins)
    pairs, _ = tokenize_rows(kept["train"], tok)
    assert [p.margin for p in pairs] == [m for m in margins if m >= 3]


def test_ratings_named_as_argilla_does(tmp_path):
    row = {"prompt": "Q ", "chosen": "a", "rejected": "b", "chosen-rating": 5, "rejected-rating": 2}
    assert load(write_jsonl(tmp_path / "r.jsonl", [row]))["train"][0]["margin"] == 3.0
    with pytest.raises(DataError, match="have no scores"):
        load(EXAMPLES / "standard.jsonl", min_score_margin=1)


def test_nested_field_mapping():
    fields = dict(
        prompt_field="input.messages", chosen_field="answers.better", rejected_field="answers.worse"
    )
    rows = load(EXAMPLES / "nested.jsonl", **fields)
    assert set(rows.formats) == {"mapped"}
    assert rows["train"][0]["prompt"] == [user("What is the boiling point of water at sea level?")]
    assert rows["train"][0]["chosen"] == assistant("100 degrees Celsius.")
    with pytest.raises(DataError, match=r"missing field 'answers.best' .*--chosen-field"):
        load(EXAMPLES / "nested.jsonl", **{**fields, "chosen_field": "answers.best"})


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz", ".jsonl.bz2", ".jsonl.zst"])
def test_compressed_files_read_like_plain_ones(tmp_path, suffix):
    plain = EXAMPLES / "standard.jsonl"
    raw = plain.read_bytes()
    if suffix == ".json.gz":
        raw = json.dumps([json.loads(line) for line in raw.splitlines()]).encode()
    path = tmp_path / f"pairs{suffix}"
    if suffix.endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(raw)
    else:
        path.write_bytes(gzip.compress(raw) if suffix.endswith(".gz") else bz2.compress(raw))
    strip = lambda rows: [{k: v for k, v in r.items() if k != "source"} for r in rows]  # noqa: E731
    assert strip(load(path)["train"]) == strip(load(plain)["train"])
    # directories find compressed split files too
    (tmp_path / "d").mkdir()
    path.rename(tmp_path / "d" / f"train{suffix}")
    assert len(load(tmp_path / "d")["train"]) == len(load(plain)["train"])


def test_broken_gzip_is_one_clear_problem(tmp_path):
    path = tmp_path / "x.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match=r"x.jsonl.gz: not a readable gzip file"):
        load(path)


# ---------------------------------------------------------------------------------------------
# Degenerate and invalid rows


def test_rows_without_signal_are_skipped_and_counted(tok, tmp_path):
    rows = [
        {"prompt": "Q1 ", "chosen": "yes", "rejected": "no"},
        {"prompt": "Q2 ", "chosen": "", "rejected": " "},  # both answers empty
        {"prompt": "Q3 ", "chosen": "same", "rejected": "same"},
        {"prompt": "Q4 " * 40, "chosen": "yes", "rejected": "no"},  # prompt fills max_length
        {"prompt": "Q5 ", "chosen": "", "rejected": "no"},  # one empty answer: kept
    ]
    loaded = load(write_jsonl(tmp_path / "d.jsonl", rows))
    assert [(p.source[-1], p.reason) for p in loaded.skipped] == [
        ("2", "both answers empty"), ("3", "chosen == rejected")
    ]  # fmt: skip
    pairs, stats = tokenize_rows(loaded["train"], tok, max_length=32)
    assert [p.source[-1] for p in pairs] == ["1", "5"]
    assert [(p.source[-1], p.reason) for p in stats.skipped] == [("4", "prompt fills max_length")]
    assert stats.n_dropped == 1


def test_skip_invalid_rows_counts_reasons_and_writes_them(tmp_path):
    lines = [json.dumps({"prompt": f"Q{i} ", "chosen": "a", "rejected": "b"}) for i in range(6)]
    lines[1] = '{"prompt": "broken'
    lines[3] = json.dumps({"prompt": "Q", "chosen": "a"})
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSON"):
        load(path)
    rows = load(path, skip_invalid_rows=True)
    assert len(rows["train"]) == 4
    out = write_skipped(tmp_path / "skipped_rows.jsonl", rows.skipped)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(w["source"], w["reason"]) for w in written] == [
        (f"{path}:2", "malformed JSON"), (f"{path}:4", "missing field")
    ]  # fmt: skip
    assert "missing field 'rejected'" in written[1]["problem"]


def test_more_than_half_invalid_still_fails(tmp_path):
    rows = [{"question": "Q", "good": "a", "bad": "b"}] * 3 + [
        {"prompt": "P ", "chosen": "a", "rejected": "b"}
    ]
    with pytest.raises(DataError) as err:
        load(write_jsonl(tmp_path / "d.jsonl", rows), skip_invalid_rows=True)
    first = str(err.value).splitlines()[0]
    assert "3 of 4 rows are invalid (3 missing field)" in first and "mapping" in first


def test_problem_count_is_true_across_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "P"}] * 8)
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "P"}] * 5)
    with pytest.raises(DataError) as err:
        load_splits(str(tmp_path))
    lines = str(err.value).splitlines()
    assert len(lines) == 11 and lines[-1].startswith(f"... and 3 more problems in {tmp_path}")


def test_json_array_items_are_counted_from_one(tmp_path):
    path = tmp_path / "array.json"
    path.write_text(json.dumps([{"prompt": "P ", "chosen": "a", "rejected": "b"}, {"prompt": "P"}]))
    with pytest.raises(DataError, match=rf"^{path}: item 2: missing fields 'chosen', 'rejected'"):
        load(path)


def test_detect_names_each_format():
    assert detect({"prompt": "p", "chosen": "a", "rejected": "b"}) == "standard"
    assert (
        detect({"prompt": [user("q")], "chosen": assistant("a"), "rejected": []})
        == "conversational"
    )
    assert detect({"chosen": "x a", "rejected": "x b"}) == "implicit"
    assert detect({"question": "q", "chosen": "a", "rejected": "b"}) == "orca"
    assert detect({"conversations": [], "chosen": {}, "rejected": {}}) == "sharegpt"
    assert detect({"input": {"messages": []}, "preferred_output": []}) == "openai"
    assert detect({"q": 1}, ("q", "a", "b")) == "mapped"


# ---------------------------------------------------------------------------------------------
# Batch tokenization equals row-by-row tokenization


def reference_pair(row: dict, tok) -> tuple[list, list, list]:
    """TRL's convention, one text at a time: the whole prompt and whole rows, common prefix."""
    hf = tok._tokenizer
    if isinstance(row["prompt"], list):
        render = lambda m, g: hf.apply_chat_template(m, tokenize=False, add_generation_prompt=g)  # noqa: E731
        texts = [render(row["prompt"], True)] + [
            render(row["prompt"] + row[k], False) for k in ("chosen", "rejected")
        ]
    else:
        texts = [row["prompt"]] + [
            row["prompt"] + row[k] + "<|im_end|>" for k in ("chosen", "rejected")
        ]
    prompt, chosen, rejected = (hf.encode(t, add_special_tokens=False) for t in texts)
    k = 0
    while k < len(prompt) and prompt[k] == chosen[k] == rejected[k]:
        k += 1
    return prompt[:k], chosen[k:], rejected[k:]


def varied_rows(n: int) -> list[dict]:
    words = "The quick brown fox\njumps over\n\nthe lazy dog. What is the capital of France?".split(
        " "
    )
    rows = []
    for i in range(n):
        prompt = " ".join(words[: 3 + i % 9]) + ("\n" if i % 3 == 0 else " " if i % 3 == 1 else "")
        chosen, rejected = " ".join(words[i % 5 : 7]), "\n".join(words[i % 4 : 6])
        if i % 2:
            rows.append(
                {
                    "prompt": [user(prompt)],
                    "chosen": assistant(chosen),
                    "rejected": assistant(rejected),
                }
            )
        else:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return [{**r, "source": f"r:{i}"} for i, r in enumerate(rows)]


def test_batch_tokenization_matches_one_row_at_a_time(tok):
    rows = varied_rows(60)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # some varied rows repeat an answer
        pairs, _ = tokenize_rows(rows, tok, max_length=None, chunk=7)
    by_source = {p.source: p for p in pairs}
    for row in rows:
        want = reference_pair(row, tok)
        if want[1] != want[2]:
            p = by_source[row["source"]]
            assert (p.prompt_ids, p.chosen_ids, p.rejected_ids) == want, row


def test_shared_text_cut_is_checked_and_dropped_when_wrong(tok, monkeypatch):
    import re

    from mlx_dpo import tokenization

    real_init = tokenization.Encoder.__init__

    def bad_cuts(self, *args):
        real_init(self, *args)
        self.cut = re.compile(r"(?<=qu)")  # inside a word: encoding each side alone differs

    monkeypatch.setattr(tokenization.Encoder, "__init__", bad_cuts)
    rows = [{"prompt": "The quick brown ", "chosen": "fox", "rejected": "dog", "source": "r:0"}]
    (pair,), _ = tokenize_rows(rows, tok)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == reference_pair(rows[0], tok)
