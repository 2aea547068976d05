"""`mlx_dpo compare`: both columns reproducible under a seed and equal to plain mlx-lm
generation from the base model and from the base model with the adapters."""

from __future__ import annotations

import json

import mlx.core as mx
import mlx_lm
import pytest
from click.testing import CliRunner
from mlx_lm.sample_utils import make_sampler
from tiny import make_adapter

from mlx_dpo.cli import main
from mlx_dpo.compare import Comparison, format_one, read_prompts, to_markdown

PROMPTS = ["What is 2 plus 3?", "Say hello to the world."]


@pytest.fixture(scope="module")
def adapter(tiny_model_path, tmp_path_factory):
    # random lora_b large enough that the tuned model generates other tokens
    return make_adapter(tiny_model_path, tmp_path_factory.mktemp("cmp") / "adapter", std=0.05)


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n\n")  # blank lines are skipped
    return path


def compare(*args: str) -> str:
    result = CliRunner().invoke(main, ["compare", *args])
    assert result.exit_code == 0, result.output
    return result.output


def expected(model_dir, adapter_dir, tokens, *, seed, temp, max_tokens) -> str:
    """Plain mlx-lm: load (with or without the adapter), seed, generate."""
    model, tokenizer = mlx_lm.load(str(model_dir), adapter_path=adapter_dir and str(adapter_dir))
    mx.random.seed(seed)
    sampler = make_sampler(temp=temp)
    return mlx_lm.generate(model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler)


def chat_tokens(model_dir, text: str) -> list[int]:
    _, tokenizer = mlx_lm.load(str(model_dir))
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


def test_columns_are_seeded_and_equal_plain_mlx_lm(
    tiny_model_path, adapter, prompts_file, tmp_path
):
    args = ["--adapter-path", str(adapter), "--prompts", str(prompts_file)]
    args += ["--max-tokens", "6", "--temp", "1.0", "--seed", "3"]
    compare(*args, "--output", str(tmp_path / "a.jsonl"))
    compare(*args, "--output", str(tmp_path / "b.jsonl"))
    first = (tmp_path / "a.jsonl").read_text()
    assert first == (tmp_path / "b.jsonl").read_text()
    results = [json.loads(line) for line in first.splitlines()]
    assert [r["prompt"] for r in results] == PROMPTS
    assert results[0]["seed"] == 3 and results[0]["temp"] == 1.0 and results[0]["max_tokens"] == 6
    for r in results:
        tokens = chat_tokens(tiny_model_path, r["prompt"])
        kw = dict(seed=3, temp=1.0, max_tokens=6)
        assert r["base"] == expected(tiny_model_path, None, tokens, **kw)
        assert r["tuned"] == expected(tiny_model_path, adapter, tokens, **kw)
    assert any(r["base"] != r["tuned"] for r in results)


def test_terminal_table_and_markdown(adapter, prompts_file, tmp_path):
    out = compare(
        "--adapter-path", str(adapter), "--prompts", str(prompts_file), "--max-tokens", "4",
        "--temp", "0", "--num-prompts", "1", "--output", str(tmp_path / "c.md"),
    )  # fmt: skip
    assert "[1] What is 2 plus 3?" in out and "[2]" not in out
    assert "base (adapters off)" in out and "| tuned" in out
    md = (tmp_path / "c.md").read_text()
    assert "## 1. What is 2 plus 3?" in md
    assert "| base (adapters off) | tuned |" in md
    assert "- temp: `0.0`" in md


def test_prompts_from_data_use_the_training_tokens(tiny_model_path, adapter, tmp_path):
    from mlx_dpo.config import TrainConfig
    from mlx_dpo.training import load_pairs

    rows = [
        {"prompt": f"What is {a} plus 1? ", "chosen": f"{a} plus 1 is {a + 1}.", "rejected": "No."}
        for a in range(1, 7)
    ]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:]))
    compare(
        "--adapter-path", str(adapter), "--data", str(data), "--max-tokens", "5",
        "--temp", "0", "--output", str(tmp_path / "d.jsonl"),
    )  # fmt: skip
    results = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    cfg = TrainConfig(model=str(tiny_model_path), data=str(data))
    _, valid = load_pairs(cfg, mlx_lm.load(str(tiny_model_path))[1], log=lambda *_: None)
    assert [r["source"] for r in results] == [p.source for p in valid]
    for r, pair in zip(results, valid, strict=True):
        assert r["chosen"] == next(x["chosen"] for x in rows if x["prompt"] == r["prompt"])
        kw = dict(seed=0, temp=0.0, max_tokens=5)
        assert r["base"] == expected(tiny_model_path, None, pair.prompt_ids, **kw)
        assert r["tuned"] == expected(tiny_model_path, adapter, pair.prompt_ids, **kw)


def test_read_prompts_formats_and_errors(tmp_path):
    good = tmp_path / "p.jsonl"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    good.write_text("\n".join(json.dumps(x) for x in ["plain", messages, {"prompt": "field"}]))
    assert [p for _, p in read_prompts(good)] == ["plain", messages, "field"]
    assert read_prompts(good)[2][0] == f"{good}:3"

    bad = tmp_path / "bad.jsonl"
    bad.write_text('"ok"\n{"question": "x"}\nnot json\n')
    with pytest.raises(ValueError) as e:
        read_prompts(bad)
    assert f"{bad}:2: expected a string" in str(e.value)
    assert f"{bad}:3: malformed JSON" in str(e.value)


def test_user_errors_exit_2(adapter, prompts_file, tmp_path):
    runner = CliRunner()
    base = ["compare", "--adapter-path", str(adapter)]
    both = runner.invoke(main, [*base, "--prompts", str(prompts_file), "--data", str(tmp_path)])
    assert both.exit_code == 2 and "not both" in both.output
    suffix = runner.invoke(
        main, [*base, "--prompts", str(prompts_file), "--max-tokens", "1", "--output", "x.txt"]
    )
    assert suffix.exit_code == 2 and "use a .jsonl or a .md file" in suffix.output
    missing = runner.invoke(
        main, ["compare", "--adapter-path", str(tmp_path / "nope"), "--prompts", str(prompts_file)]
    )
    assert missing.exit_code == 2 and "no such directory" in missing.output
    no_file = runner.invoke(main, [*base, "--prompts", str(tmp_path / "none.txt")])
    assert no_file.exit_code == 2 and "no such file" in no_file.output


def test_format_one_columns():
    c = Comparison("A question?", "base answer " * 8, "tuned", "f:1")
    text = format_one(1, c, width=60)
    lines = text.splitlines()
    assert lines[0] == "[1] A question?"
    assert all(len(line) <= 60 for line in lines)
    assert lines[3].endswith("| tuned")
    blank = format_one(2, Comparison("q", "\n\n", "x", "f:2"), width=60)
    assert "(blank) '\\n\\n'" in blank
    assert "| base (adapters off) | tuned |" in to_markdown([c], {})
