"""Data layer: every input format and source, the prompt/completion boundary checked by hand on
the tiny ChatML tokenizer, truncation, batching invariants and the error messages."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlx_lm.utils import load_tokenizer
from tiny import build_tiny_model

from mlx_dpo.data import (
    CHATML,
    DataError,
    PreferencePair,
    collate,
    dataset_stats,
    eval_batches,
    iterate_batches,
    load_splits,
    rank_share,
    tokenize_rows,
    truncate_pair,
)

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"
SYSTEM = {"role": "system", "content": "Be brief."}
USER = {"role": "user", "content": "What is the capital of France?"}


def turn(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def std_rows(n: int) -> list[dict]:
    return [{"prompt": f"Q{i}: ", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]


@pytest.fixture(scope="module")
def tok(tiny_model_path):
    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="module")
def tok_plain(tmp_path_factory):
    """The same tokenizer without a chat template."""
    return load_tokenizer(build_tiny_model(tmp_path_factory.mktemp("plain"), chat_template=None))


def decode(tok, ids) -> str:
    return tok.decode(ids)


# ---------------------------------------------------------------------------------------------
# Formats and sources


def test_standard_jsonl_with_extra_fields_and_blank_lines(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"prompt": "P", "chosen": "C", "rejected": "R", "score": 3}) + "\n\n"
        + json.dumps({"prompt": "P2", "chosen": "C2", "rejected": "R2"}) + "\n"
    )  # fmt: skip
    rows = load_splits(str(path), valid_fraction=0)
    assert list(rows) == ["train"]
    assert rows["train"] == [
        {"prompt": "P", "chosen": "C", "rejected": "R", "source": f"{path}:1"},
        {"prompt": "P2", "chosen": "C2", "rejected": "R2", "source": f"{path}:3"},
    ]


def test_conversational_rows_keep_system_prompt(tmp_path):
    path = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"prompt": [SYSTEM, USER], "chosen": turn("Paris."), "rejected": turn("Lyon.")}],
    )
    (row,) = load_splits(str(path), valid_fraction=0)["train"]
    assert row["prompt"] == [SYSTEM, USER] and row["chosen"] == turn("Paris.")


def test_implicit_prompt_from_text_backs_up_one_space(tmp_path):
    path = write_jsonl(
        tmp_path / "t.jsonl", [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}]
    )
    (row,) = load_splits(str(path), valid_fraction=0)["train"]
    # Like TRL's extract_prompt, the space before the answers goes with the answers.
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("Q: hi A:", " yes", " no")


def test_implicit_prompt_from_conversations(tmp_path):
    rows = [
        {"chosen": [SYSTEM, USER, *turn("Paris.")], "rejected": [SYSTEM, USER, *turn("Lyon.")]},
        # a text prompt beside full conversations (UltraFeedback) is inferred the same way
        {"prompt": "ignored", "chosen": [USER, *turn("A")], "rejected": [USER, *turn("B")]},
        # a text prompt beside bare answers becomes the user's turn
        {"prompt": "Hi", "chosen": turn("A"), "rejected": turn("B")},
        # a chat prompt beside plain-text answers: they are the assistant's turn
        {"prompt": [USER], "chosen": "A", "rejected": "B"},
    ]
    out = load_splits(str(write_jsonl(tmp_path / "c.jsonl", rows)), valid_fraction=0)["train"]
    assert out[0]["prompt"] == [SYSTEM, USER] and out[0]["chosen"] == turn("Paris.")
    assert out[1]["prompt"] == [USER] and out[1]["rejected"] == turn("B")
    assert out[2]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert out[3]["chosen"] == turn("A") and out[3]["rejected"] == turn("B")


def test_field_names_are_remappable(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"q": "P", "good": "C", "bad": "R"}])
    kw = dict(prompt_field="q", chosen_field="good", rejected_field="bad", valid_fraction=0)
    assert load_splits(str(path), **kw)["train"][0]["chosen"] == "C"


def test_json_array_and_json_lines_in_a_json_file(tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps(std_rows(3), indent=2))
    rows = load_splits(str(array), valid_fraction=0)["train"]
    assert [r["source"] for r in rows] == [f"{array}: item {i}" for i in range(1, 4)]
    lines = write_jsonl(tmp_path / "b.json", std_rows(2))
    assert len(load_splits(str(lines), valid_fraction=0)["train"]) == 2


def test_parquet_with_message_structs(tmp_path):
    path = tmp_path / "c.parquet"
    rows = [
        {"prompt": [SYSTEM, USER], "chosen": turn("Paris."), "rejected": turn("Lyon.")},
        {"prompt": [USER], "chosen": turn("A"), "rejected": turn("B")},
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    out = load_splits(str(path), valid_fraction=0)["train"]
    assert out[0]["prompt"] == [SYSTEM, USER] and out[1]["source"] == f"{path}:row 1"


def test_directory_with_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", std_rows(4))
    (tmp_path / "valid.json").write_text(json.dumps(std_rows(2)))
    pq.write_table(pa.Table.from_pylist(std_rows(3)), tmp_path / "test.parquet")
    rows = load_splits(str(tmp_path))
    assert {k: len(v) for k, v in rows.items()} == {"train": 4, "valid": 2, "test": 3}


def test_directory_with_hub_layout_and_split_names(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, n in [("train_prefs", 4), ("train_sft", 5), ("test_prefs", 2)]:
        pq.write_table(pa.Table.from_pylist(std_rows(n)), data / f"{name}-00000-of-00001.parquet")
    with pytest.raises(DataError, match="several file sets match split 'train'.*--data-split"):
        load_splits(str(tmp_path))
    rows = load_splits(str(tmp_path), data_split="train=train_prefs,valid=test_prefs")
    assert {k: len(v) for k, v in rows.items()} == {"train": 4, "valid": 2}
    assert rows["train"][0]["source"] == f"{data}/train_prefs-00000-of-00001.parquet:row 0"


def test_valid_split_is_carved_from_train_deterministically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", std_rows(40))
    a, b = load_splits(str(path), seed=3), load_splits(str(path), seed=3)
    assert a == b and len(a["valid"]) == 4 and len(a["train"]) == 36
    sources = {r["source"] for r in a["train"]} | {r["source"] for r in a["valid"]}
    assert len(sources) == 40  # disjoint and complete
    assert load_splits(str(path), seed=4)["valid"] != a["valid"]
    assert "valid" not in load_splits(str(path), valid_fraction=0)


# ---------------------------------------------------------------------------------------------
# Tokenization: the prompt/completion boundary, checked by hand


def test_conversational_boundary_on_chatml(tok):
    rows = [{"prompt": [SYSTEM, USER], "chosen": turn("Paris."), "rejected": turn("Lyon.")}]
    (pair,), stats = tokenize_rows([{**rows[0], "source": "x:1"}], tok)
    assert decode(tok, pair.prompt_ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    # The end-of-turn token and ChatML's newline belong to the completion and are scored.
    assert decode(tok, pair.chosen_ids) == "Paris.<|im_end|>\n"
    assert decode(tok, pair.rejected_ids) == "Lyon.<|im_end|>\n"
    whole = tok.apply_chat_template([SYSTEM, USER, *turn("Paris.")], tokenize=True)
    assert pair.prompt_ids + pair.chosen_ids == list(whole)
    assert pair.prompt == [SYSTEM, USER] and stats.n_pairs == 1 and stats.n_boundary_merged == 0


def test_standard_boundary_appends_eos_once(tok):
    rows = [
        {"prompt": "Q: capital of France?\nA: ", "chosen": "Paris.", "rejected": "Lyon."},
        {"prompt": "Q: capital of France?\nA: ", "chosen": "Paris.<|im_end|>", "rejected": "No"},
    ]
    pairs, _ = tokenize_rows([{**r, "source": f"x:{i}"} for i, r in enumerate(rows)], tok)
    assert decode(tok, pairs[0].chosen_ids) == "Paris.<|im_end|>"
    assert decode(tok, pairs[0].prompt_ids) == "Q: capital of France?\nA: "
    assert pairs[1].chosen_ids == pairs[0].chosen_ids  # EOS already there: not doubled
    assert pairs[0].chosen_ids[-1] == tok.eos_token_id


def test_boundary_merge_moves_the_merged_token_into_the_completion(tok):
    # " France" is one BPE token: tokenized alone the prompt ends in a bare " " token.
    row = {"prompt": "What is the capital of ", "chosen": "France?", "rejected": "Spain?"}
    (pair,), stats = tokenize_rows([{**row, "source": "x:1"}], tok)
    assert decode(tok, pair.prompt_ids) == "What is the capital of"
    assert decode(tok, pair.chosen_ids) == " France?<|im_end|>"
    full = tok.encode("What is the capital of France?<|im_end|>", add_special_tokens=False)
    assert pair.prompt_ids + pair.chosen_ids == full
    assert stats.n_boundary_merged == 1


class BosTokenizer:
    """A Llama-like tokenizer: one token per character, BOS=1 added by default."""

    bos_token_id, eos_token, chat_template = 1, "</s>", None

    def encode(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text.replace("</s>", "\x02")]  # EOS is id 2
        return [1, *ids] if add_special_tokens else ids


def test_bos_added_once_to_prompt_and_row_when_the_tokenizer_uses_one():
    rows = [
        {"prompt": "ab", "chosen": "c", "rejected": "d", "source": "x:1"},
        {"prompt": "ab", "chosen": "c", "rejected": "d</s>", "source": "x:2"},
    ]
    pairs, _ = tokenize_rows(rows, BosTokenizer())
    assert pairs[0].prompt_ids == [1, ord("a"), ord("b")]
    assert pairs[0].chosen_ids == [ord("c"), 2] and pairs[1].rejected_ids == [ord("d"), 2]


def test_conversational_rows_need_a_chat_template(tok_plain, tok, tmp_path):
    chat = [
        {"prompt": [USER], "chosen": turn("Paris."), "rejected": turn("Lyon."), "source": "f:3"}
    ]
    with pytest.raises(
        DataError, match="f:3: conversational rows.*need a chat template.*--chat-template"
    ):
        tokenize_rows(chat, tok_plain)
    (with_name,), _ = tokenize_rows(chat, tok_plain, chat_template="chatml")
    (reference,), _ = tokenize_rows(chat, tok)
    assert with_name == reference
    template_file = tmp_path / "t.jinja"
    template_file.write_text(CHATML)
    assert tokenize_rows(chat, tok_plain, chat_template=str(template_file))[0] == [reference]
    assert tokenize_rows(chat, tok_plain, chat_template=CHATML)[0] == [reference]
    with pytest.raises(DataError, match="not a file, 'chatml', or a Jinja template"):
        tokenize_rows(chat, tok_plain, chat_template="no-such-template")
    standard = [{"prompt": "Q: ", "chosen": "A", "rejected": "B", "source": "f:1"}]
    assert tokenize_rows(standard, tok_plain)[1].n_pairs == 1


def test_template_errors_name_the_row(tok):
    template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}ok"
    rows = [
        {"prompt": [SYSTEM, USER], "chosen": turn("A"), "rejected": turn("B"), "source": "f:7"},
        {"prompt": [USER], "chosen": turn("A"), "rejected": turn("B"), "source": "f:8"},
    ]
    with pytest.raises(DataError) as err:
        tokenize_rows(rows, tok, chat_template=template)
    lines = str(err.value).splitlines()
    assert lines[0].startswith("f:7: ") and "no system role" in lines[0]
    assert any(line.startswith("f:8: ") and "no tokens" in line for line in lines)


# ---------------------------------------------------------------------------------------------
# Truncation


def test_truncation_modes():
    prompt, chosen, rejected = [1, 10, 11, 12, 13], [20, 21, 22], [30]

    def cut(mode="keep_start", max_length=None, max_prompt_length=None, bos_id=None):
        return truncate_pair(
            prompt,
            chosen,
            rejected,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            truncation_mode=mode,
            bos_id=bos_id,
        )

    # max_prompt_length: keep_start keeps the first prompt tokens, keep_end the last ones,
    # with a leading BOS kept in front of them
    assert cut(max_prompt_length=3) == ([1, 10, 11], chosen, rejected, True)
    assert cut("keep_end", max_prompt_length=3)[0] == [11, 12, 13]
    assert cut("keep_end", max_prompt_length=3, bos_id=1)[0] == [1, 12, 13]
    # then max_length: the prompt stays whole and completions lose their end
    assert cut(max_length=7) == (prompt, [20, 21], [30], True)
    assert cut("keep_end", max_length=7) == (prompt, [20, 21], [30], True)
    # a prompt that fills max_length leaves no room for an answer: dropped
    assert cut(max_length=5) is None and cut("keep_end", max_length=5) is None
    assert cut("keep_end", max_length=5, max_prompt_length=3)[:3] == ([11, 12, 13], [20, 21], [30])
    assert cut(max_length=8, max_prompt_length=5) == (prompt, chosen, rejected, False)


def test_tokenize_counts_truncated_dropped_and_identical(tok):
    rows = [
        {"prompt": "Q: ", "chosen": "one two three four five", "rejected": "no", "source": "f:1"},
        {"prompt": "The quick brown fox jumps over the lazy dog. " * 3, "chosen": "a",
         "rejected": "b", "source": "f:2"},
        {"prompt": "Q: ", "chosen": "same", "rejected": "same", "source": "f:3"},
        {"prompt": "Q: ", "chosen": "yes", "rejected": "no", "source": "f:4"},
    ]  # fmt: skip
    with pytest.warns(UserWarning, match="skipped 1 pairs.*f:3"):
        pairs, stats = tokenize_rows(rows, tok, max_length=8)
    assert [p.source for p in pairs] == ["f:1", "f:4"]
    assert (stats.n_rows, stats.n_pairs, stats.n_truncated, stats.n_dropped, stats.n_identical) == (
        4, 2, 1, 1, 1
    )  # fmt: skip
    assert pairs[0].truncated and len(pairs[0].prompt_ids) + len(pairs[0].chosen_ids) == 8
    assert not pairs[1].truncated
    assert "4 rows -> 2 pairs (1 truncated, 1 dropped" in str(stats)
    assert stats.chosen_lengths[0] > len(pairs[0].chosen_ids)  # lengths before truncation


def test_keep_end_prompt_keeps_the_generation_prompt(tok):
    long_user = {"role": "user", "content": "one two three four five six seven eight nine ten " * 4}
    row = {"prompt": [SYSTEM, long_user], "chosen": turn("A"), "rejected": turn("B"), "source": "f"}
    (pair,), stats = tokenize_rows([row], tok, max_prompt_length=12, truncation_mode="keep_end")
    assert len(pair.prompt_ids) == 12 and pair.truncated and stats.n_truncated == 1
    assert decode(tok, pair.prompt_ids).endswith("<|im_end|>\n<|im_start|>assistant\n")


def test_no_pairs_left_is_an_error(tok):
    rows = [{"prompt": "The quick brown fox. " * 4, "chosen": "a", "rejected": "b", "source": "f"}]
    with pytest.raises(DataError, match="no pairs left.*1 dropped.*--max-length"):
        tokenize_rows(rows, tok, max_length=4)


# ---------------------------------------------------------------------------------------------
# Batches


def make_pairs(n: int, seed: int = 0) -> list[PreferencePair]:
    rng = np.random.default_rng(seed)
    pairs = []
    for i in range(n):
        p, c, r = rng.integers(1, 40, size=3)
        pairs.append(
            PreferencePair(
                prompt_ids=list(range(100, 100 + p)),
                chosen_ids=list(range(200, 200 + c)),
                rejected_ids=list(range(300, 300 + r)),
                source=f"f:{i}",
                prompt="",
            )
        )
    return pairs


def test_collate_shapes_masks_and_positions():
    pairs = make_pairs(3)
    batch = collate(pairs, ref_chosen=np.array([1.0, 2, 3]), ref_rejected=np.zeros(3))
    tokens = np.array(batch.tokens)
    positions, targets = np.array(batch.positions), np.array(batch.targets)
    target_mask = np.array(batch.target_mask)
    T = tokens.shape[1]
    assert tokens.shape == (6, T) and T % 32 == 0
    assert positions.shape == targets.shape == target_mask.shape and positions.shape[1] % 32 == 0
    rows = [(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]
    for r, (pair, completion) in enumerate(rows):
        start, n = len(pair.prompt_ids), len(completion)
        assert list(tokens[r, : start + n]) == pair.prompt_ids + completion
        assert not tokens[r, start + n :].any()  # right padding
        # the target at t is tokens[t + 1]: the first scored target is the first completion token
        assert list(positions[r, :n]) == list(range(start - 1, start - 1 + n))
        assert list(targets[r, :n]) == completion and target_mask[r].sum() == n
        assert list(tokens[r, positions[r, :n] + 1]) == list(targets[r, :n])
    assert batch.size == 3 and list(batch.index) == [0, 1, 2]
    assert batch.n_tokens == sum(len(p.prompt_ids) + len(c) for p, c in rows)
    assert np.array(batch.ref_chosen).tolist() == [1.0, 2.0, 3.0]


def collect(updates, n):
    """Per update: the pair indices each rank's micro-batches hold."""
    return [next(updates) for _ in range(n)]


def test_every_pair_once_per_epoch_across_ranks_and_accumulation():
    pairs = make_pairs(50)
    B, A, W = 2, 3, 2  # 12 pairs a global update: 4 updates an epoch, 2 pairs left out
    runs = [iterate_batches(pairs, B, grad_accumulation_steps=A, rank=r, world_size=W, seed=1)
            for r in range(W)]  # fmt: skip
    epochs = {}
    for _ in range(8):
        ups = [next(run) for run in runs]
        assert len({(u.step, u.epoch) for u in ups}) == 1
        for u in ups:
            assert len(u.micro_batches) == A and all(b.size == B for b in u.micro_batches)
            epochs.setdefault(u.epoch, []).extend(i for b in u.micro_batches for i in b.index)
    assert sorted(epochs) == [0, 1]
    for used in epochs.values():
        assert len(used) == 48 and len(set(used)) == 48
    left_out = [set(range(50)) - set(used) for used in epochs.values()]
    assert left_out[0] != left_out[1]  # the 2 left-out pairs rotate
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_batches_are_length_bucketed_and_padded():
    pairs = make_pairs(64)
    lengths = np.array(
        [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    )
    spreads = []
    for u in collect(iterate_batches(pairs, 4), 16):
        (batch,) = u.micro_batches
        assert batch.tokens.shape[1] % 32 == 0
        spreads.append(np.ptp(lengths[batch.index]))
    assert np.mean(spreads) < 0.25 * np.ptp(lengths)  # sorted neighbours, not random pairs


def test_iteration_is_deterministic_and_resumes_exactly():
    pairs = make_pairs(30)

    def indices(**kw):
        run = iterate_batches(pairs, 2, grad_accumulation_steps=2, **kw)
        return [(u.step, [b.index.tolist() for b in u.micro_batches]) for u in collect(run, 20)]

    full = indices(seed=5)
    assert full == indices(seed=5) and full != indices(seed=6)
    assert indices(seed=5, start_step=9)[:11] == full[9:]


def test_dataset_smaller_than_one_update_is_a_clear_error():
    with pytest.raises(DataError, match="has 5 pairs but one update needs .* = 8"):
        next(iterate_batches(make_pairs(5), 4, grad_accumulation_steps=2))


def test_evaluation_is_one_pass_in_length_order_sharded_like_training():
    pairs = make_pairs(11)
    lengths = [len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    by_length = sorted(range(11), key=lambda i: lengths[i])
    first = [b.index.tolist() for b in eval_batches(pairs, 4)]
    assert first == [by_length[:4], by_length[4:8], by_length[8:]]  # the last batch partial
    for W in (2, 3):
        shares = [[b.index.tolist() for b in eval_batches(pairs, 4, rank=r, world_size=W)]
                  for r in range(W)]  # fmt: skip
        seen = [i for share in shares for batch in share for i in batch]
        assert sorted(seen) == list(range(11))  # every pair once over the ranks
        # rank r holds the r-th contiguous piece of each global batch of 4 x W pairs
        assert [share[0] for share in shares] == [by_length[4 * r : 4 * r + 4] for r in range(W)]
    limited = [b.index.tolist() for b in eval_batches(pairs, 4, max_batches=2)]
    assert limited == [by_length[:4], by_length[4:8]]
    split = [b.index.tolist() for r in (0, 1) for b in eval_batches(pairs, 4, rank=r,
             world_size=2, max_batches=2)]  # fmt: skip
    assert sorted(i for b in split for i in b) == sorted(by_length[:8])


def test_training_and_evaluation_take_the_same_rank_share():
    """One way of sharding: rank r gets the r-th contiguous piece of a global batch."""
    assert rank_share(np.arange(12), 1, 3).tolist() == [4, 5, 6, 7]
    assert rank_share(np.arange(5), 2, 3).tolist() == [4]
    pairs = make_pairs(24)
    B, A, W = 2, 2, 3
    full = iterate_batches(pairs, B * A * W, seed=3)  # one rank: the whole global update
    ranks = [iterate_batches(pairs, B, grad_accumulation_steps=A, rank=r, world_size=W, seed=3)
             for r in range(W)]  # fmt: skip
    for _ in range(3):
        (whole,) = next(full).micro_batches
        for r, run in enumerate(ranks):
            mine = [i for b in next(run).micro_batches for i in b.index]
            assert mine == whole.index[r * B * A : (r + 1) * B * A].tolist()


def test_reference_logps_follow_their_pairs():
    pairs = make_pairs(8)
    ref = np.arange(8, dtype=np.float32)
    for u in collect(iterate_batches(pairs, 4, ref_chosen=ref, ref_rejected=-ref), 4):
        (b,) = u.micro_batches
        assert np.array(b.ref_chosen).tolist() == ref[b.index].tolist()
        assert np.array(b.ref_rejected).tolist() == (-ref[b.index]).tolist()


# ---------------------------------------------------------------------------------------------
# Bad input: one line per problem, naming file and line


def test_every_bad_row_reported_with_file_line_and_problem(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        json.dumps({"prompt": "P", "chosen": "C", "rejected": "R"}),
        '{"prompt": "P", "chosen": "C", "rejected": ',
        json.dumps({"prompt": "P", "chosen": "C"}),
        json.dumps({"prompt": " ", "chosen": "", "rejected": "R"}),
        json.dumps({"prompt": 3, "chosen": "C", "rejected": "R"}),
        json.dumps({"prompt": [{"role": "user"}], "chosen": turn("C"), "rejected": turn("R")}),
        json.dumps({"prompt": [{"content": "hi"}], "chosen": "C", "rejected": "R"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"prompt": "P", "chosen": "C", "rejected": turn("R")}),
    ]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_splits(str(path))
    got = str(err.value).splitlines()
    expected = [
        (2, "malformed JSON"),
        (3, "missing field 'rejected' (fields present: prompt, chosen; map yours with --rejected-field)"),
        (4, "field 'prompt' is empty"),
        (5, "field 'prompt' must be a string or a list of {role, content} messages, got int"),
        (6, "field 'prompt' message 0: has no 'content'"),
        (7, "field 'prompt' message 0: has no 'role'"),
        (8, "expected an object with prompt/chosen/rejected, got a JSON list"),
        (9, "must both be strings or both be lists of messages"),
    ]  # fmt: skip
    # one line per bad row, all reported together, and how to skip them instead
    assert got[-1] == "(or pass --skip-invalid-rows to skip invalid rows)"
    for line, (lineno, problem) in zip(got[:-1], expected, strict=True):
        assert line.startswith(f"{path}:{lineno}: ") and problem in line
    assert isinstance(err.value, ValueError)


def test_more_than_ten_bad_rows_are_summarised(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "P"}] * 15)
    with pytest.raises(DataError) as err:
        load_splits(str(path))
    got = str(err.value).splitlines()
    assert len(got) == 11 and got[9].startswith(f"{path}:10: missing fields 'chosen', 'rejected'")
    assert (
        got[10]
        == f"... and 5 more problems in {path} (or pass --skip-invalid-rows to skip invalid rows)"
    )


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("x.jsonl", b"", ": the file is empty"),
        ("x.jsonl", b"\n  \n", ": the file is empty"),
        ("x.jsonl", b'{"prompt": "P", "chosen": "C", "rejected": "R"}\n{"prompt": "caf\xe9"}\n',
         ":2: not valid UTF-8 (byte 0xe9 at column 16); re-save the file as UTF-8"),
        ("x.json", b'[{"prompt": "P",\n "chosen": }]', ":2: malformed JSON"),
        ("x.json", b"[]", ": the file has no rows"),
        ("x.parquet", b"PAR1 but not really", ": not a readable Parquet file"),
    ],
)  # fmt: skip
def test_unreadable_files(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_splits(str(path))
    first, *rest = str(err.value).splitlines()
    assert first.startswith(str(path)) and problem in first
    # a bad line can be skipped; a whole unreadable file cannot
    assert rest == (
        ["(or pass --skip-invalid-rows to skip invalid rows)"] if "UTF" in problem else []
    )


def test_line_separators_inside_strings_do_not_split_rows(tmp_path):
    path = tmp_path / "u.jsonl"
    row = {"prompt": "a\u2028b", "chosen": "C", "rejected": "R"}
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    assert load_splits(str(path), valid_fraction=0)["train"][0]["prompt"] == "a\u2028b"


def test_unknown_paths_and_missing_train_split(tmp_path):
    with pytest.raises(DataError, match="no-such.jsonl: no such file or directory; --data takes"):
        load_splits(str(tmp_path / "no-such.jsonl"))
    write_jsonl(tmp_path / "valid.jsonl", std_rows(2))
    with pytest.raises(DataError, match="no files for the train split; looked for train.jsonl"):
        load_splits(str(tmp_path))
    write_jsonl(tmp_path / "train.jsonl", std_rows(2))
    with pytest.raises(DataError, match="no files for the valid split; looked for dev.jsonl"):
        load_splits(str(tmp_path), data_split="valid=dev")
    (tmp_path / "train.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_splits(str(tmp_path / "train.csv"))


def test_implicit_prompt_that_cannot_be_inferred(tmp_path):
    path = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Yes", "rejected": "No"}])
    with pytest.raises(DataError, match=r"i.jsonl:1: no prompt field .* add a 'prompt' field"):
        load_splits(str(path))


# ---------------------------------------------------------------------------------------------
# The example files and the `data check` report


@pytest.mark.parametrize(
    ("name", "fields"),
    [
        ("standard.jsonl", {}),
        ("conversational.jsonl", {}),
        ("conversational.parquet", {}),
        ("implicit.jsonl", {}),
        ("remapped.json", dict(prompt_field="question", chosen_field="good", rejected_field="bad")),
    ],
)
def test_example_files_load_and_tokenize(tok, name, fields):
    splits = load_splits(str(EXAMPLES / name), **fields)
    assert 10 <= len(splits["train"]) + len(splits["valid"]) <= 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no identical pairs in the examples
        pairs, stats = tokenize_rows(splits["train"], tok)
    assert stats.n_pairs == len(splits["train"]) and all(p.chosen_ids for p in pairs)


def test_dataset_stats_report(tok):
    rows = load_splits(str(EXAMPLES / "standard.jsonl"))
    tokenized = {k: tokenize_rows(v, tok, max_length=40) for k, v in rows.items()}
    report = dataset_stats(
        {k: v[0] for k, v in tokenized.items()}, {k: v[1] for k, v in tokenized.items()}
    )
    assert "train" in report and "valid" in report and "p99" in report
    train_stats = tokenized["train"][1]
    assert f"train     {train_stats.n_rows:>2}" in report
    assert "max_length=40" in report
    assert "train chosen" in report and "valid rejected" in report
