"""The demo task for `build_demo.py`: simple questions answered helpfully or evasively.

Every question ("fact") has one helpful answer that restates it and is checkable by
`mlx_dpo.demo.is_preferred`, and one evasive answer of about the same length. The pretraining
corpus shows each question with both answers equally often, so the base model is ~50/50; the
preference pairs prefer the helpful answer. Facts, not prompt strings, are split between train
and valid, so no valid question is asked in train in any wording.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

# Phrasings per kind. Letter questions must end with the letter and contain no other one-letter
# word: that is how `is_preferred` finds the asked letter in a prompt.
PHRASINGS = {
    "add": (
        "What is {a} plus {b}?",
        "What is {a} + {b}?",
        "How much is {a} plus {b}?",
        "Add {a} and {b}.",
        "Please add {a} and {b}.",
        "What do you get when you add {a} and {b}?",
    ),
    "sub": (
        "What is {a} minus {b}?",
        "What is {a} - {b}?",
        "How much is {a} minus {b}?",
        "Subtract {b} from {a}.",
        "What do you get when you take {b} from {a}?",
    ),
    "bigger": (
        "Which is bigger, {a} or {b}?",
        "Which number is larger: {a} or {b}?",
        "Is {a} or {b} bigger?",
        "Tell me the bigger number of {a} and {b}.",
    ),
    "letter": (
        "What letter comes after {a}?",
        "Which letter follows {a}?",
        "What is the next letter after {a}?",
        "Name the letter that comes after {a}.",
    ),
}
# One evasive answer per kind, close in token length to the helpful one, so that the base model
# gives both about the same log-probability (neither side has more variants to spread over).
EVASIVE = {
    "add": "Sorry, I can not do sums.",
    "sub": "Sorry, I am bad at math.",
    "bigger": "Sorry, I can not compare them.",
    "letter": "Sorry, I do not know the alphabet.",
}


@dataclass(frozen=True)
class Fact:
    kind: str
    a: int | str
    b: int | str | None

    def prompts(self) -> list[str]:
        return [p.format(a=self.a, b=self.b) for p in PHRASINGS[self.kind]]

    def helpful(self) -> str:
        a, b = self.a, self.b
        if self.kind == "add":
            return f"{a} plus {b} is {a + b}."
        if self.kind == "sub":
            return f"{a} minus {b} is {a - b}."
        if self.kind == "bigger":
            return f"{max(a, b)} is bigger than {min(a, b)}."
        return f"The letter after {a} is {chr(ord(a) + 1)}."

    def evasive(self) -> str:
        return EVASIVE[self.kind]


def all_facts() -> list[Fact]:
    digits = range(10)
    facts = [Fact("add", a, b) for a in digits for b in digits]
    facts += [Fact("sub", a, b) for a in digits for b in range(a + 1)]
    facts += [Fact("bigger", a, b) for a in digits for b in digits if a != b]
    facts += [Fact("letter", c, None) for c in string.ascii_lowercase[:-1]]
    return facts


def split_facts(seed: int, valid_share: float = 0.15) -> tuple[list[Fact], list[Fact]]:
    """Hold out a share of each kind's facts (at least 4) for validation."""
    rng = random.Random(seed)
    train, valid = [], []
    for kind in PHRASINGS:
        facts = [f for f in all_facts() if f.kind == kind]
        rng.shuffle(facts)
        n_valid = max(4, round(valid_share * len(facts)))
        valid += facts[:n_valid]
        train += facts[n_valid:]
    return train, valid


def conversations(facts: list[Fact]) -> list[tuple[str, str]]:
    """Every (prompt, answer) of `facts`: each wording with the helpful and the evasive answer."""
    return [(p, ans) for f in facts for p in f.prompts() for ans in (f.helpful(), f.evasive())]


def preference_rows(facts: list[Fact], seed: int, per_fact: int | None = None) -> list[dict]:
    """Rows in TRL's conversational format, `per_fact` wordings of each fact (None: all).

    Conversational, not plain strings, so that trainers apply the chat template the model was
    pretrained with (a plain-text prompt would be scored as raw text).
    """
    rng = random.Random(seed)
    rows = []
    for fact in facts:
        prompts = fact.prompts()
        if per_fact is not None:
            prompts = rng.sample(prompts, min(per_fact, len(prompts)))
        rows += [
            {
                "prompt": [{"role": "user", "content": p}],
                "chosen": [{"role": "assistant", "content": fact.helpful()}],
                "rejected": [{"role": "assistant", "content": fact.evasive()}],
            }
            for p in prompts
        ]
    rng.shuffle(rows)
    return rows
