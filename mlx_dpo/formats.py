"""Preference row formats: detect each row's format and turn it into one normalized row.

A normalized row is `{"prompt", "chosen", "rejected", "source"}` with text (str) or chat
messages (`[{"role", "content"}]`) as values, plus `"margin"` (score of chosen minus score of
rejected) when the row is scored and `"tools"` when it declares tools. Formats, tried in this
order (the first whose keys a row has):

| name           | a row                                                                      |
|----------------|----------------------------------------------------------------------------|
| openai         | `{"input": {"messages", "tools"?}, "preferred_output": [msg], "non_preferred_output": [msg]}` |
| sharegpt       | `{"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": …, "system"?}` |
| orca           | `{"system"?, "question", "chosen", "rejected"}` (strings)                    |
| hh             | `{"chosen", "rejected"}` transcripts of "\\n\\nHuman: …\\n\\nAssistant: …" turns |
| standard       | `{"prompt", "chosen", "rejected"}` strings (TRL)                            |
| conversational | the same as lists of messages (TRL)                                        |
| implicit       | `{"chosen", "rejected"}` without a prompt: the common prefix is the prompt   |
| mapped         | any of the last three through --prompt-field/--chosen-field/--rejected-field, whose names may be dotted paths (`input.messages`, `answers.0`) |

Scores (UltraFeedback style) may sit beside any format: `score_chosen`/`score_rejected`,
`chosen-rating`/`rejected-rating`, `chosen_rating`/`rejected_rating`.

A row that cannot be read is a `Problem`: `structural` (wrong type, missing field, ...: the
data or the mapping is wrong) or not (a well-formed row that carries no preference signal:
both answers empty, chosen == rejected). Empty answers are valid (TRL keeps them): the answer
is just its end-of-turn/EOS token(s).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

DEFAULT_FIELDS = ("prompt", "chosen", "rejected")
FIELD_FLAGS = ("prompt-field", "chosen-field", "rejected-field")
FORMAT_NAMES = {
    "openai": "OpenAI preference fine-tuning (input.messages, preferred_output, non_preferred_output)",
    "sharegpt": "ShareGPT / LLaMA-Factory (conversations, chosen, rejected)",
    "orca": "Orca/Argilla (system, question, chosen, rejected)",
    "hh": "Anthropic HH transcripts",
    "standard": "TRL standard (prompt, chosen, rejected as text)",
    "conversational": "TRL conversational (lists of messages)",
    "implicit": "TRL implicit prompt (chosen, rejected; the prompt is their common prefix)",
    "mapped": "mapped fields",
}
SCORE_FIELDS = (
    ("score_chosen", "score_rejected"),
    ("chosen-rating", "rejected-rating"),
    ("chosen_rating", "rejected_rating"),
)
ROLES = {  # ShareGPT / LLaMA-Factory speaker names -> chat roles
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
HELP = "see 'Data formats' in the README"
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class Problem:
    """Why one row is not used: `reason` is a short key for counting, `message` the detail."""

    source: str
    reason: str
    message: str
    structural: bool = True

    def __str__(self) -> str:
        return f"{self.source}: {self.message}"


def get_field(record: dict, name: str) -> tuple[Any, bool]:
    """(value, found) of a field; a dotted name walks into objects and lists."""
    if name in record:
        return record[name], True
    value: Any = record
    for part in name.split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None, False
    return value, True


def is_hh(value: Any) -> bool:
    """Whether a value is an Anthropic HH transcript: Human first, an Assistant turn last."""
    if not isinstance(value, str):
        return False
    turns = _HH_TURN.findall(value.lstrip("\n"))
    return len(turns) >= 2 and turns[0] == "Human" and turns[-1] == "Assistant"


def detect(record: Any, fields: tuple[str, str, str] = DEFAULT_FIELDS) -> str:
    """The format name of one row (see the table in the module docstring)."""
    if not isinstance(record, dict):
        return "invalid"
    if tuple(fields) != DEFAULT_FIELDS:
        return "mapped"
    if isinstance(record.get("input"), dict) and (
        "preferred_output" in record or "non_preferred_output" in record
    ):
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if record.get("prompt") is None:
        if record.get("question") is not None:
            return "orca"
        if is_hh(record.get("chosen")) and is_hh(record.get("rejected")):
            return "hh"
        return "implicit"
    if isinstance(record.get("prompt"), list) or isinstance(record.get("chosen"), list):
        return "conversational"
    return "standard"


def parse_hh(text: str) -> list[dict]:
    """Messages of an HH transcript; a trailing "Assistant:" with nothing after is an empty
    answer."""
    text = text.lstrip("\n")
    marks = list(_HH_TURN.finditer(text))
    messages = []
    for mark, nxt in zip(marks, [*marks[1:], None], strict=True):
        content = text[mark.end() : nxt.start() if nxt else len(text)]
        role = "user" if mark.group(1) == "Human" else "assistant"
        messages.append({"role": role, "content": content.strip()})
    return messages


def as_message(value: Any) -> Any:
    """A message in {role, content} form: ShareGPT {from, value} keys and speaker names mapped,
    OpenAI content parts joined, Parquet's absent keys (None) dropped; others unchanged."""
    if not isinstance(value, dict):
        return value
    message = {k: v for k, v in value.items() if v is not None}
    if "role" not in message and "from" in message:
        speaker = message.pop("from")
        message["role"] = ROLES.get(str(speaker).lower(), speaker)
        if "value" in message:
            message["content"] = message.pop("value")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and "text" in p for p in content):
        message["content"] = "".join(str(p["text"]) for p in content)
    if message.get("content") is None and "tool_calls" in message:
        message["content"] = ""  # an assistant turn that only calls tools
    return message


def as_messages(value: Any) -> Any:
    """A list of messages as `as_message`; a single message object becomes a list of one."""
    if isinstance(value, dict) and ("role" in value or "from" in value):
        value = [value]
    if isinstance(value, list):
        return [as_message(m) for m in value]
    return value


def extract(record: dict, fmt: str, fields: tuple[str, str, str], hh_messages: bool):
    """`(values, names, problem)`: the prompt/chosen/rejected of a row in its format, the
    names to use in messages about each, or one problem message (missing fields)."""
    if fmt == "openai":
        names = ("input.messages", "preferred_output", "non_preferred_output")
    elif fmt == "sharegpt":
        names = ("conversations", "chosen", "rejected")
    elif fmt == "orca":
        names = ("question", "chosen", "rejected")
    else:
        names = tuple(fields)
    got = [get_field(record, n) for n in names]
    optional_prompt = fmt in ("standard", "conversational", "implicit", "mapped", "hh")
    missing = [
        n
        for n, (v, _) in zip(names, got, strict=True)
        if v is None and not (n == names[0] and optional_prompt)
    ]
    if missing:
        present = ", ".join(map(str, record)) or "none"
        fix = ""
        if fmt in ("standard", "conversational", "implicit", "mapped"):
            flags = "/".join(f"--{FIELD_FLAGS[names.index(f)]}" for f in missing)
            fix = f"; map yours with {flags}"
        quoted = ", ".join(f"'{f}'" for f in missing)
        plural = "s" * (len(missing) > 1)
        return None, names, f"missing field{plural} {quoted} (fields present: {present}{fix})"
    prompt, chosen, rejected = (v for v, _ in got)
    if fmt == "sharegpt":
        system = record.get("system")
        turns = as_messages(prompt)
        if isinstance(system, str) and system.strip() and isinstance(turns, list):
            turns = [{"role": "system", "content": system}, *turns]
        prompt = turns
    elif fmt == "orca":
        system = record.get("system")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if isinstance(system, str) and system.strip() and isinstance(prompt, list):
            prompt = [{"role": "system", "content": system}, *prompt]
        chosen, rejected = _turn(chosen), _turn(rejected)
    elif fmt == "hh" and hh_messages:
        values = _hh_messages(chosen, rejected)
        if isinstance(values, str):
            return None, names, values
        return values, ("chosen", "chosen", "rejected"), None
    values = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return values, names, None


def _turn(text: Any) -> Any:
    return [{"role": "assistant", "content": text}] if isinstance(text, str) else text


def _hh_messages(chosen: str, rejected: str) -> dict | str:
    c, r = parse_hh(chosen), parse_hh(rejected)
    if c[:-1] != r[:-1]:
        return "the chosen and rejected transcripts differ before their last Assistant turn"
    return {"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]}


def score_margin(record: dict) -> tuple[float | None, str | None]:
    """(chosen score - rejected score, None), (None, None) when unscored, or a problem."""
    for chosen_key, rejected_key in SCORE_FIELDS:
        if chosen_key in record or rejected_key in record:
            c, r = record.get(chosen_key), record.get(rejected_key)
            if c is None or r is None:
                return None, None
            numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (c, r))
            if not numbers:
                return (
                    None,
                    f"scores '{chosen_key}'/'{rejected_key}' must be numbers, got {c!r}, {r!r}",
                )
            return float(c) - float(r), None
    return None, None


# ---------------------------------------------------------------------------------------------
# One record -> one normalized row


def normalize_row(
    record: Any,
    source: str,
    fields: tuple[str, str, str] = DEFAULT_FIELDS,
    *,
    hh_messages: bool = False,
    fmt: str | None = None,
) -> tuple[dict | None, Problem | None]:
    """One checked row `{"prompt", "chosen", "rejected", "source", ("margin", "tools")}`, or
    why the record is not used."""
    fmt = fmt or detect(record, fields)
    if fmt == "invalid":
        kind = type(record).__name__
        message = f"expected an object with {'/'.join(fields)}, got a JSON {kind}; {HELP}"
        return None, Problem(source, "not an object", message)
    values, names, problem = extract(record, fmt, fields, hh_messages)
    if problem:
        reason = "missing field" if problem.startswith("missing") else "bad transcript"
        return None, Problem(source, reason, problem)
    prompt, chosen, rejected = (as_messages(values[k]) for k in DEFAULT_FIELDS)
    checks = [(chosen, names[1], False), (rejected, names[2], False)]
    if prompt is not None:
        checks.insert(0, (prompt, names[0], True))
    for value, name, is_prompt in checks:
        bad = _check_value(value, name, is_prompt)
        if bad:
            return None, Problem(source, bad[0], bad[1])
    if isinstance(chosen, str) != isinstance(rejected, str):
        message = f"'{names[1]}' and '{names[2]}' must both be strings or both be lists of messages"
        return None, Problem(source, "wrong type", message)
    prompt, chosen, rejected = _same_shape(prompt, chosen, rejected)
    if prompt is None:
        split = split_implicit_prompt(chosen, rejected)
        if isinstance(split, Problem):
            return None, Problem(source, split.reason, split.message, split.structural)
        prompt, chosen, rejected = split
    if _is_empty(chosen) and _is_empty(rejected):
        return None, Problem(source, "both answers empty", "both answers are empty", False)
    if chosen == rejected:
        return None, Problem(
            source, "chosen == rejected", "chosen and rejected are the same", False
        )
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "source": source}
    margin, bad_score = score_margin(record)
    if bad_score:
        return None, Problem(source, "wrong type", bad_score)
    if margin is not None:
        row["margin"] = margin
    tools = record.get("tools")
    if fmt == "openai":
        tools = record["input"].get("tools", tools)
    if isinstance(tools, list) and tools and isinstance(prompt, list):
        row["tools"] = tools
    return row, None


def _same_shape(prompt, chosen, rejected) -> tuple:
    """A text prompt with conversations, or a chat prompt with text answers, put in one form
    (prompt None: to be split off the conversations)."""
    if isinstance(prompt, list) and isinstance(chosen, str):
        # A chat prompt with plain-text answers: the answers are the assistant's turn.
        chosen, rejected = _turn(chosen), _turn(rejected)
    if isinstance(prompt, str) and isinstance(chosen, list):
        # A text prompt beside conversations. UltraFeedback-style rows repeat it inside them
        # (TRL's maybe_extract_prompt then infers the prompt); otherwise it is the user's turn.
        shared = common_prefix_length(chosen, rejected) > 0
        prompt = None if shared else [{"role": "user", "content": prompt}]
    return prompt, chosen, rejected


def _check_value(value: Any, field: str, is_prompt: bool) -> tuple[str, str] | None:
    if isinstance(value, str):
        if is_prompt and not value.strip():
            return "empty prompt", f"field '{field}' is empty"
        return None  # an empty answer is valid: it is scored on its end-of-turn token(s)
    if not isinstance(value, list):
        return "wrong type", (
            f"field '{field}' must be a string or a list of {{role, content}} messages, "
            f"got {type(value).__name__}"
        )
    if not value:
        return "bad message", f"field '{field}' is an empty list of messages"
    for i, message in enumerate(value):
        problem = _check_message(message)
        if problem:
            return "bad message", f"field '{field}' message {i}: {problem}"
    return None


def _check_message(message: Any) -> str | None:
    if not isinstance(message, dict):
        return f"expected a {{role, content}} object, got {type(message).__name__}"
    for key in ("role", "content"):
        if message.get(key) is None:
            return f"has no '{key}'"
        if not isinstance(message[key], str):
            return f"'{key}' must be a string, got {type(message[key]).__name__}"
    return None


def _is_empty(answer: str | list[dict]) -> bool:
    if isinstance(answer, str):
        return not answer.strip()
    return all(not m["content"].strip() for m in answer)


def common_prefix_length(a: list | str, b: list | str) -> int:
    """Number of leading items (tokens, messages or characters) `a` and `b` share."""
    limit = min(len(a), len(b))
    if a[:limit] == b[:limit]:  # the common case for tokens: one comparison at C speed
        return limit
    n = 0
    while a[n] == b[n]:
        n += 1
    return n


def split_implicit_prompt(chosen, rejected):
    """(prompt, chosen, rejected) from two strings or two conversations, or a `Problem`.

    The prompt is the longest common prefix (of messages, or of characters); as in TRL's
    extract_prompt, a space right before the split stays with the completions. A text answer
    may end up empty (an HH transcript ending at "Assistant:"): it is scored on its end token.
    """
    if chosen == rejected:
        return Problem("", "chosen == rejected", "chosen and rejected are the same", False)
    n = common_prefix_length(chosen, rejected)
    if isinstance(chosen, str) and 0 < n and chosen[n - 1] == " ":
        n -= 1
    what = "text" if isinstance(chosen, str) else "messages"
    if n == 0:
        return Problem(
            "",
            "no prompt",
            f"no prompt field and chosen/rejected share no leading {what}, so the prompt cannot "
            "be inferred; add a 'prompt' field",
        )
    if isinstance(chosen, list) and (n == len(chosen) or n == len(rejected)):
        message = "no prompt field and one conversation is a prefix of the other (no answer turn)"
        return Problem("", "no prompt", message)
    return chosen[:n], chosen[n:], rejected[n:]
