"""`mlx_dpo data check` on every example file: the detected format, the tokenizer and limits it
uses, skipped rows, and sample pairs with the trained tokens marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from mlx_dpo.cli import main

EXAMPLES = Path(__file__).parent.parent / "examples" / "data"
NESTED = ["--prompt-field", "input.messages", "--chosen-field", "answers.better"]
NESTED += ["--rejected-field", "answers.worse"]


def check(*args: str):
    return CliRunner().invoke(main, ["data", "check", *args])


@pytest.mark.parametrize(
    ("name", "flags", "fmt"),
    [
        ("standard.jsonl", [], "TRL standard"),
        ("conversational.parquet", [], "TRL conversational"),
        ("implicit.jsonl", [], "TRL implicit prompt"),
        ("remapped.json", ["--prompt-field", "question", "--chosen-field", "good", "--rejected-field", "bad"], "mapped fields"),
        ("openai.jsonl", [], "OpenAI preference fine-tuning"),
        ("sharegpt.json", [], "ShareGPT / LLaMA-Factory"),
        ("hh.jsonl.gz", [], "Anthropic HH transcripts as chat messages"),
        ("orca.jsonl", [], "Orca/Argilla"),
        ("ultrafeedback.jsonl", ["--min-score-margin", "1"], "TRL conversational"),
        ("nested.jsonl", NESTED, "mapped fields"),
    ],
)  # fmt: skip
def test_every_example_file_checks(name, flags, fmt):
    result = check("--data", str(EXAMPLES / name), *flags)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "tokenizer: the bundled demo model's (ChatML template), as no --model was given" in out
    assert "limits: max_length=1024," in out  # the documented default, not the demo's 64
    assert f"format: {fmt}" in out
    assert "3 sample pairs; only the tokens between [[ and ]] are trained:" in out
    assert out.count("  chosen ") == 3 and out.count("tokens: [[") == 6


def test_samples_mark_the_boundary_and_skips_are_counted(tiny_model_path):
    result = check("--data", str(EXAMPLES / "ultrafeedback.jsonl"), "--min-score-margin", "3")
    assert "skipped 5 rows: 5 score margin below minimum" in result.output
    result = check("--data", str(EXAMPLES / "standard.jsonl"), "--model", str(tiny_model_path))
    assert result.exit_code == 0 and "tokenizer:" not in result.output
    first = json.loads((EXAMPLES / "standard.jsonl").read_text().splitlines()[0])
    # the prompt as rendered, then the answer tokens (EOS included) between the markers
    assert "prompt" in result.output and first["prompt"] in result.output
    assert f"[[{first['chosen']}<|im_end|>]]" in result.output


def test_invalid_rows_fail_or_are_skipped(tmp_path):
    rows = [{"prompt": f"Q{i} ", "chosen": "a", "rejected": "b"} for i in range(5)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": 3}\n')
    result = check("--data", str(path))
    assert result.exit_code == 2
    assert f"Error: {path}:6: missing fields 'chosen', 'rejected'" in result.output
    result = check("--data", str(path), "--skip-invalid-rows")
    assert result.exit_code == 0 and "skipped 1 rows: 1 missing field" in result.output
