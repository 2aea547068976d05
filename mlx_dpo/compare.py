"""Side-by-side generations of the base model (adapters off) and the tuned model.

Both columns come from mlx-lm's `generate` on the same prompt tokens with the same sampler
(`make_sampler(temp, top_p)`), and every generation starts from `mx.random.seed(seed)`, so a
column is reproducible and the two differ only by the adapters. The base column swaps the
adapter layers out (`model.adapters_off`) rather than loading a second model.

Prompts come from a file (`read_prompts`: text lines, or JSON lines with a prompt string or
message list), rendered with the tokenizer's chat template as one user turn when it has one;
or from a preference data split, tokenized exactly as training tokenized them.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path

import mlx.core as mx

from mlx_dpo.config import ConfigError
from mlx_dpo.data import DataError
from mlx_dpo.model import adapters_off


@dataclass
class Prompt:
    text: str | list[dict]  # as given: a string or a list of {role, content} messages
    tokens: list[int]
    source: str
    chosen: str | list[dict] | None = None  # the data's answers, when the prompt came from data
    rejected: str | list[dict] | None = None


@dataclass
class Comparison:
    prompt: str | list[dict]
    base: str
    tuned: str
    source: str
    chosen: str | list[dict] | None = None
    rejected: str | list[dict] | None = None


def read_prompts(path: str | Path, prompt_field: str = "prompt") -> list[tuple[str, object]]:
    """(source, prompt) of each prompt in `path`: a text file (one prompt a line), or JSON lines
    (`.jsonl`/`.json`) of strings, message lists, or objects whose `prompt_field` is either."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file")
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    numbered = [(f"{path}:{i}", line) for i, line in enumerate(lines, start=1) if line.strip()]
    if path.suffix.lower() not in (".jsonl", ".json"):
        return numbered
    prompts, problems = [], []
    for source, line in numbered:
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{source}: malformed JSON ({e.msg} at column {e.colno})")
            continue
        if isinstance(value, dict):
            value = value.get(prompt_field)
        if isinstance(value, str) or _is_messages(value):
            prompts.append((source, value))
        else:
            problems.append(
                f"{source}: expected a string, a list of {{role, content}} messages, or an "
                f"object with a '{prompt_field}' field holding one"
            )
    if problems:
        raise DataError(problems[:10])
    return prompts


def _is_messages(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def encode_prompt(
    tokenizer, prompt: str | list[dict], use_template: bool = True, chat_template: str | None = None
) -> list[int]:
    """Token ids of a prompt to generate from: rendered with the chat template (`chat_template`,
    as in `--chat-template`, else the tokenizer's own) plus the generation prompt, a string as
    one user turn; without a template (or `use_template=False`) the text itself."""
    from mlx_dpo.encoder import Encoder

    enc = Encoder(tokenizer, chat_template)
    if isinstance(prompt, list) or (use_template and enc.has_template):
        messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return enc.generation_prompts([messages])[0]
    return list(tokenizer.encode(prompt))


def prompts_from_file(
    tokenizer, path, *, prompt_field="prompt", use_template=True, chat_template=None
) -> list[Prompt]:
    return [
        Prompt(text, encode_prompt(tokenizer, text, use_template, chat_template), source)
        for source, text in read_prompts(path, prompt_field)
    ]


def prompts_from_data(cfg, tokenizer, split: str | None = None, log=print) -> list[Prompt]:
    """The prompts of a preference split, with the token ids training used for them."""
    from mlx_dpo.evaluate import load_eval_pairs

    _, pairs = load_eval_pairs(cfg, tokenizer, split, log)
    rows = _rows_by_source(cfg, pairs)
    return [
        Prompt(
            p.prompt,
            list(p.prompt_ids),
            p.source,
            rows.get(p.source, {}).get("chosen"),
            rows.get(p.source, {}).get("rejected"),
        )
        for p in pairs
    ]


def _rows_by_source(cfg, pairs) -> dict[str, dict]:
    # The answers are shown next to the generations; a second read of the rows is cheap.
    from mlx_dpo import data

    try:
        splits = data.load_splits(cfg.data, **cfg.data_kwargs())
    except DataError:
        return {}
    wanted = {p.source for p in pairs}
    return {r["source"]: r for rows in splits.values() for r in rows if r["source"] in wanted}


def generate_both(
    model,
    tokenizer,
    prompts: list[Prompt],
    *,
    max_tokens: int = 128,
    temp: float = 0.7,
    top_p: float = 1.0,
    seed: int = 0,
    on_result=None,
) -> list[Comparison]:
    """Generate from the base (adapters off) and the tuned model for every prompt, with a
    progress display (answers done, rate, ETA) that also ticks during a long answer."""
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_dpo.progress import Progress

    sampler = make_sampler(temp=temp, top_p=top_p)
    progress = Progress("generation", 2 * len(prompts), unit="answers")

    def one(tokens: list[int]) -> str:
        mx.random.seed(seed)
        text = ""  # as mlx_lm.generate builds it, token by token
        for response in stream_generate(
            model, tokenizer, tokens, max_tokens=max_tokens, sampler=sampler
        ):
            text += response.text
            progress.update(0)  # redraw (or a line every few seconds) during a long answer
        progress.update(1)
        return text

    results = []
    with progress:
        for p in prompts:
            with adapters_off(model):
                base = one(p.tokens)
            result = Comparison(p.text, base, one(p.tokens), p.source, p.chosen, p.rejected)
            results.append(result)
            if on_result is not None:
                progress.close()  # clear the bar before the caller prints the result
                on_result(len(results), result)
    return results


def prompt_text(prompt: str | list[dict]) -> str:
    """What to show for a prompt: the text, or the last user turn of a conversation."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1]["content"])


def answer_text(answer) -> str:
    if answer is None or isinstance(answer, str):
        return answer or ""
    return "\n".join(str(m.get("content", "")) for m in answer)


def format_one(index: int, c: Comparison, width: int | None = None) -> str:
    """One prompt and its two answers in columns, for the terminal."""
    width = width or shutil.get_terminal_size((100, 24)).columns
    col = max(20, (width - 3) // 2)
    head = textwrap.shorten(prompt_text(c.prompt).replace("\n", " "), width - 8, placeholder="...")
    lines = [
        f"[{index}] {head}",
        f"{'base (adapters off)':<{col}} | tuned",
        "-" * col + "-+-" + "-" * col,
    ]
    left, right = _wrap(c.base, col), _wrap(c.tuned, col)
    lines += [f"{a:<{col}} | {b}".rstrip() for a, b in zip_longest(left, right, fillvalue="")]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    if not text.strip():
        return [f"(blank) {text!r}"[:width]]
    out = []
    for para in text.strip().splitlines() or [""]:
        out += textwrap.wrap(para, width) or [""]
    return out


def write_output(results: list[Comparison], path: str | Path, settings: dict) -> Path:
    """`.jsonl`: one object per prompt with the settings; `.md`: a table per prompt."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".md"):
        raise ConfigError(f"--output {path}: use a .jsonl or a .md file")
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".jsonl":
        text = "".join(json.dumps({**_drop_none(asdict(r)), **settings}) + "\n" for r in results)
    else:
        text = to_markdown(results, settings)
    path.write_text(text, encoding="utf-8")
    return path


def _drop_none(d: dict) -> dict:
    return {k: v for k, v in d.items() if v is not None}


def to_markdown(results: list[Comparison], settings: dict) -> str:
    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|").replace("\n", "<br>") or " "

    lines = ["# mlx_dpo compare", ""]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    for i, r in enumerate(results, start=1):
        lines += ["", f"## {i}. {cell(prompt_text(r.prompt))}", ""]
        lines += [
            "| base (adapters off) | tuned |",
            "|---|---|",
            f"| {cell(r.base)} | {cell(r.tuned)} |",
        ]
        if r.chosen is not None:
            lines += ["", f"Data's chosen answer: {cell(answer_text(r.chosen))}"]
            lines += [f"Data's rejected answer: {cell(answer_text(r.rejected))}"]
    return "\n".join(lines) + "\n"
