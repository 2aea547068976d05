"""Rewards for `mlx_dpo iterate`: a user's function (`--reward module:function`) or a judge model.

A reward function has TRL's signature, so functions written for TRL's GRPO/online trainers work
as they are:

    def score(prompts, completions, **row_fields) -> list[float]

`prompts[i]` is the i-th sample's prompt as the prompts file gives it (a string, or a list of
chat messages); `completions[i]` is the sampled answer: a string for a string prompt, and
`[{"role": "assistant", "content": text}]` for a message-list prompt (TRL's conversational
convention). Every other field of the prompt rows comes as a keyword argument holding one value
per sample (`answer=[...]` for a checker). The function returns one number per sample; None
means "cannot score this one" (the sample is left out of pairing, as TRL does).

A function that raises, or returns the wrong number of values or something that is not a
number, is a user error (`RewardError`): one line naming the function and the batch.

The judge (`--judge-model`) is an mlx-lm model asked, through a template users can replace, to
rate each answer; its greedy reply's first number is the reward (a reply without one: None).
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from mlx_dpo.config import ConfigError

JUDGE_TEMPLATE = """Rate how well the answer responds to the question, from 0 (useless, evasive \
or wrong) to 10 (helpful and correct). Reply with the number only.

Question: {prompt}

Answer: {completion}"""
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class RewardError(ConfigError):
    """The reward function failed on a batch; the samples of earlier batches are saved."""


def load_reward(spec: str) -> Callable:
    """`module:function`, imported with the working directory on the path (as `python -m` does)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--reward {spec}: expected module:function, e.g. my_rewards:score")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # the user's module: any error in it is theirs to fix
        raise ConfigError(
            f"--reward {spec}: cannot import {module_name} ({type(e).__name__}: {e}); "
            "it must be importable from the working directory"
        ) from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
    if not callable(fn):
        raise ConfigError(f"--reward {spec}: {module_name} has no function {attr}")
    fn.reward_name = spec  # type: ignore[attr-defined]
    return fn


def reward_name(fn: Callable) -> str:
    return getattr(fn, "reward_name", getattr(fn, "__qualname__", repr(fn)))


def call_reward(
    fn: Callable, prompts: Sequence, completions: Sequence, fields: dict, batch: str
) -> list[float | None]:
    """`fn`'s rewards for one batch, checked; `batch` names it in errors ("batch 3 (p.jsonl:9-12)")."""
    name = reward_name(fn)
    try:
        values = fn(prompts=list(prompts), completions=list(completions), **fields)
    except Exception as e:  # the user's code: report it as theirs, in one line
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RewardError(
            f"reward {name} raised {type(e).__name__}{': ' + detail if detail else ''} on "
            f"{batch}; the samples scored so far are saved: fix it and continue with --resume"
        ) from None
    try:
        values = list(values)
    except TypeError:
        values = None
    if values is None or len(values) != len(completions):
        got = "a non-list" if values is None else f"{len(values)} values"
        raise RewardError(
            f"reward {name} returned {got} for the {len(completions)} completions of {batch}; "
            "it must return one number per completion"
        )
    return [_as_reward(v, name, batch, i) for i, v in enumerate(values)]


def _as_reward(value, name: str, batch: str, i: int) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, str) or not math.isfinite(number):
        raise RewardError(
            f"reward {name} returned {value!r} for completion {i} of {batch}; "
            "expected a finite number (or None to leave a completion unscored)"
        )
    return number


def demo_reward(prompts, completions, **_) -> list[float]:
    """The bundled demo's rule as a 0/1 reward: 1 for a helpful, correct answer to the question."""
    from mlx_dpo import demo

    return [
        float(demo.is_preferred(completion_text(c), p))
        for p, c in zip(prompts, completions, strict=True)
    ]


demo_reward.reward_name = "mlx_dpo.demo.is_preferred"  # type: ignore[attr-defined]


def completion_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(str(m.get("content", "")) for m in completion)


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    return str(users[-1] if users else prompt[-1]["content"])


def read_template(path: str | None) -> str:
    """The judge template: a file with {prompt} and {completion}, or the built-in one."""
    if path is None:
        return JUDGE_TEMPLATE
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--judge-template {path}: cannot read it ({e.strerror or e})") from None
    missing = [k for k in ("{prompt}", "{completion}") if k not in text]
    if missing:
        raise ConfigError(
            f"--judge-template {path}: needs the placeholders {{prompt}} and {{completion}} "
            f"(missing {', '.join(missing)})"
        )
    return text


def parse_score(reply: str) -> float | None:
    """The first number in a judge's reply ("Score: 7/10" -> 7.0), or None."""
    match = _NUMBER.search(reply)
    return float(match.group()) if match else None


class JudgeReward:
    """A reward function (TRL signature) that asks an mlx-lm model to rate each answer."""

    def __init__(self, model: str, template: str, *, max_tokens: int = 8, load_kwargs=None):
        self.model_name, self.template, self.max_tokens = model, template, max_tokens
        self.load_kwargs = load_kwargs or {}
        self.reward_name = f"--judge-model {model}"
        self._loaded = None

    def render(self, prompt, completion) -> str:
        # str.replace, not format: answers and templates may hold braces of their own
        text = self.template.replace("{prompt}", prompt_text(prompt))
        return text.replace("{completion}", completion_text(completion))

    def __call__(self, prompts, completions, **_) -> list[float | None]:
        from mlx_lm.generate import batch_generate

        from mlx_dpo.compare import encode_prompt
        from mlx_dpo.model import load

        if self._loaded is None:
            self._loaded = load(self.model_name, **self.load_kwargs)
        tokenizer = self._loaded.tokenizer
        tokens = [
            encode_prompt(tokenizer, self.render(p, c))
            for p, c in zip(prompts, completions, strict=True)
        ]
        if not tokens:
            return []
        # greedy: a judge's score should not depend on the sampling seed
        replies = batch_generate(
            self._loaded.model, tokenizer, tokens, max_tokens=self.max_tokens
        ).texts
        return [parse_score(r) for r in replies]
