"""The bundled demo: a tiny chat model and preference pairs that show DPO working in minutes.

The task is *helpful vs evasive*. Every prompt is a simple question with one checkable answer
(``What is 3 plus 4?``, ``Which letter follows c?``, ``Which is bigger, 2 or 9?``). The model,
pretrained from scratch by ``examples/build_demo.py``, saw every question answered helpfully
("3 plus 4 is 7.") half of the time and evasively ("Sorry, I can not do sums.") the other half,
so before tuning it does either with about equal odds. The preference pairs prefer the helpful
answer; DPO on them should make the model answer held-out questions helpfully.

Helpful answers restate the question, so `is_preferred` can check them from the answer alone:
an answer counts when it is one of the helpful forms *and* correct. Given the prompt as well it
also checks that the answer is about the question that was asked.

The rows of ``data/{train,valid}.jsonl`` are in TRL's conversational format,
``{"prompt": [user message], "chosen": [assistant message], "rejected": [assistant message]}``,
so trainers render them with the model's chat template, as the model saw them in pretraining.
A prompt given to the functions below may be that message list or the question as a string.

Nothing here trains; the trainer (``mlx_dpo train`` without --model/--data) uses these files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

Prompt = str | list[dict]  # a question, or chat messages ending with the user's turn

DEMO_DIR = Path(__file__).resolve().parent
MODEL_DIR = DEMO_DIR / "model"
DATA_DIR = DEMO_DIR / "data"
SETTINGS_FILE = DEMO_DIR / "demo.yaml"

__all__ = [
    "DATA_DIR",
    "MODEL_DIR",
    "SETTINGS_FILE",
    "fresh_run_dir",
    "is_demo",
    "settings",
    "with_defaults",
    "is_preferred",
    "preferred_share",
    "sample_answers",
]

# The helpful answer forms: pattern, correctness check, and which groups are the question's
# operands. They live here, not in the builder, so the rule that reports on the demo ships with it.
_HELPFUL = (
    (re.compile(r"(\d+) plus (\d+) is (\d+)\."), lambda a, b, c: int(a) + int(b) == int(c), 2),
    (re.compile(r"(\d+) minus (\d+) is (\d+)\."), lambda a, b, c: int(a) - int(b) == int(c), 2),
    (re.compile(r"(\d+) is bigger than (\d+)\."), lambda a, b: int(a) > int(b), 2),
    (re.compile(r"The letter after ([a-y]) is ([b-z])\."), lambda a, b: ord(b) == ord(a) + 1, 1),
)


def _messages(prompt: Prompt) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _asked(prompt: Prompt, letter: bool) -> list[str]:
    prompt = _messages(prompt)[-1]["content"]
    # Letter questions end with the letter (phrasings avoid other one-letter words before it).
    if letter:
        return re.findall(r"\b([a-z])\b", prompt)[-1:]
    return sorted(re.findall(r"\d+", prompt))


def is_preferred(answer: str, prompt: Prompt | None = None) -> bool:
    """True when `answer` is a helpful answer in one of the demo's forms and is correct.

    Evasive answers ("Sorry, ..."), wrong results and anything garbled are not preferred. With
    `prompt`, the answer must also be about the question asked: it uses the prompt's numbers, or
    for a letter question starts from the prompt's letter.
    """
    answer = answer.strip()
    for pattern, check, n_operands in _HELPFUL:
        match = pattern.fullmatch(answer)
        if match is None:
            continue
        if not check(*match.groups()):
            return False
        if prompt is None:
            return True
        letter = n_operands == 1
        used = list(match.groups()[:n_operands])
        return (used if letter else sorted(used)) == _asked(prompt, letter)
    return False


def sample_answers(
    model,
    tokenizer,
    prompts: Sequence[Prompt],
    *,
    n: int = 1,
    temp: float = 0.7,
    seed: int = 0,
    max_tokens: int = 24,
) -> list[str]:
    """Sample `n` answers per prompt with mlx-lm; returns them prompt by prompt (len = n * len).

    Each prompt (a question, or chat messages) is rendered with the tokenizer's chat template.
    All answers are generated as one batch (mlx-lm's `batch_generate`: ~10x faster than one at
    a time for the demo's 48 prompts). The global MLX random state is seeded once with `seed`,
    so a call is reproducible for a given model and list of prompts.
    """
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    from mlx_dpo.encoder import Encoder

    rendered = Encoder(tokenizer, None).generation_prompts([_messages(p) for p in prompts])
    tokens = [ids for ids in rendered for _ in range(n)]
    if not tokens:
        return []
    mx.random.seed(seed)
    size = len(tokens)
    response = batch_generate(
        model,
        tokenizer,
        tokens,
        max_tokens=max_tokens,
        sampler=make_sampler(temp=temp),
        completion_batch_size=size,
        prefill_batch_size=size,
    )
    return list(response.texts)


def preferred_share(model, tokenizer, prompts: Sequence[Prompt], **kw) -> float:
    """Share of sampled answers that `is_preferred` accepts (each checked against its prompt).

    Keyword arguments go to `sample_answers` (n, temp, seed, max_tokens).
    """
    n = kw.get("n", 1)
    answers = sample_answers(model, tokenizer, prompts, **kw)
    if not answers:
        return 0.0
    asked = [p for p in prompts for _ in range(n)]
    return sum(is_preferred(a, p) for a, p in zip(answers, asked, strict=True)) / len(answers)


# --- the demo as `mlx_dpo train` runs it without --model and --data (MLX-free)
def settings() -> dict:
    """demo.yaml: the demo's training settings; flags and --config override them."""
    from mlx_dpo.config import read_yaml

    return read_yaml(SETTINGS_FILE)


def fresh_run_dir(path: str | Path) -> str:
    """`path`, or `path-2`, `path-3`, ... the first that holds no run and is not in use, so a
    rerun of the demo never meets the last one's directory."""
    from mlx_dpo.rundir import RunDir

    path = candidate = Path(path)
    n = 1
    while RunDir(candidate).has_saved_work() or RunDir(candidate).is_locked():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return str(candidate)


def with_defaults(cfg):
    """`cfg` with the demo's model and data where it names none."""
    from dataclasses import replace

    return replace(cfg, model=cfg.model or str(MODEL_DIR), data=cfg.data or str(DATA_DIR))


def is_demo(cfg) -> bool:
    """The run trains the demo's model on the demo's data (its summary then applies)."""

    def same(a, b) -> bool:
        return a is not None and Path(a).resolve() == Path(b).resolve()

    return same(cfg.model, MODEL_DIR) and same(cfg.data, DATA_DIR)
