"""Text -> token ids for tokenization: chat templates rendered and texts encoded many rows at
a time, the same way for prompts and whole rows (see `Encoder`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from mlx_dpo.data_files import DataError
from mlx_dpo.formats import common_prefix_length

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def resolve_chat_template(chat_template: str | None) -> str | None:
    """A template given as "chatml", a file path, or the Jinja text itself."""
    if chat_template is None or chat_template.lower() == "chatml":
        return chat_template and CHATML
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template
    path = Path(chat_template).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(
        f"--chat-template {chat_template!r}: not a file, 'chatml', or a Jinja template string"
    )


class Encoder:
    """Text -> token ids the same way for prompts and whole rows, many rows at a time.

    Speed (50k pairs in seconds, not minutes) comes from three things: templates rendered a
    batch of conversations per call, the fast tokenizer's batch encoding, and encoding the
    text a prompt and its two rows share only once. That last step cuts the text where the
    tokenizer itself always cuts, so each side encodes alone to the same tokens: after a
    special token (`<|im_start|>`, ...), and, for regex byte-level tokenizers, after a newline
    before a word. It is checked against whole-row encoding on the first rows and turned off
    for good if they differ.
    """

    def __init__(self, tokenizer, chat_template: str | None):
        self.tokenizer = tokenizer
        self.template = resolve_chat_template(chat_template)
        hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx-lm's TokenizerWrapper wraps HF
        self.hf = hf
        own = getattr(tokenizer, "has_chat_template", None)  # the wrapper knows custom renderers
        if own is None:
            own = getattr(hf, "chat_template", None) is not None
        self.has_template = self.template is not None or bool(own)
        # mlx-lm's wrapper passes its thinking switch to every template; so do we.
        kwarg = getattr(tokenizer, "_thinking_kwarg", None)
        self.template_kwargs = {kwarg: tokenizer.has_thinking} if kwarg else {}
        # A custom renderer (not Jinja) is only reachable through the wrapper, one row a call.
        self.per_row = (
            self.template is None and getattr(tokenizer, "_chat_template", None) is not None
        )
        self.eos_text = getattr(hf, "eos_token", None)
        # BOS only where the tokenizer adds one on its own (Llama, Gemma; not Qwen/ChatML).
        bos = getattr(hf, "bos_token_id", None)
        default = hf.encode("a") if bos is not None else []
        self.bos_id = bos if default and default[0] == bos else None
        self.fast = getattr(hf, "_tokenizer", None)  # the Rust tokenizer of a fast HF one
        if not hasattr(self.fast, "encode_batch"):
            self.fast = None
        specials = [
            t.content for t in getattr(hf, "added_tokens_decoder", {}).values() if t.special
        ]
        specials = sorted(filter(None, specials), key=len, reverse=True)
        cuts = [re.escape(t) for t in specials]
        if _splits_at_newlines(self.fast):
            cuts.append(r"\n(?=\S)")  # a newline before a word: always a pre-token boundary
        self.cut = re.compile("|".join(cuts)) if cuts else None
        self.split_checked = 0  # rows whose split encoding matched whole-row encoding
        self.split_ok = self.cut is not None

    def text(self, text: str) -> list[int]:
        return self.with_bos(self.encode([text])[0])

    def with_bos(self, ids: list[int]) -> list[int]:
        if self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids = [self.bos_id, *ids]  # unless the text already starts with it
        return ids

    def encode(self, texts: list[str]) -> list[list[int]]:
        # Templates write their own special tokens (BOS included), as HF tokenizes them.
        if self.fast is not None:
            return [e.ids for e in self.fast.encode_batch_fast(texts, add_special_tokens=False)]
        return [list(self.hf.encode(t, add_special_tokens=False)) for t in texts]

    def render(
        self, conversations: list[list[dict]], add_generation_prompt: bool, tools=None
    ) -> list[str]:
        """Rendered chat texts; raises TemplateError/ValueError for a bad conversation."""
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        if tools:
            kwargs["tools"] = tools
        if self.per_row:
            return [self.tokenizer.apply_chat_template(c, **kwargs) for c in conversations]
        if self.template is not None:
            kwargs["chat_template"] = self.template
        out = self.hf.apply_chat_template(conversations, **kwargs, **self.template_kwargs)
        return [out] if isinstance(out, str) else list(out)

    def chat(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        return self.encode(self.render([messages], add_generation_prompt))[0]

    def generation_prompts(self, conversations: list[list[dict]]) -> list[list[int]]:
        """Token ids to generate from: each conversation rendered with the generation prompt
        (what `compare`, the demo's sampling and `iterate` feed to mlx-lm)."""
        if not self.has_template:
            raise DataError(
                "a message-list prompt needs a chat template and this tokenizer has none; "
                "pass --chat-template"
            )
        return self.encode(self.render(conversations, add_generation_prompt=True))

    def with_eos(self, text: str) -> str:
        if self.eos_text and not text.endswith(self.eos_text):
            return text + self.eos_text
        return text

    def split_point(self, prompt: str, rows: tuple[str, str]) -> int:
        """The last place in the text the prompt and both rows share where each side can be
        encoded alone (after a special token, or a newline before a word); 0 when none."""
        if not self.split_ok:
            return 0
        chosen, rejected = rows
        shared = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
        # Search the chosen row one character past the shared text, so that a newline that
        # ends the prompt is seen with the answer's first character after it.
        ends = [m.end() for m in self.cut.finditer(chosen, 0, shared + 1) if m.end() <= shared]
        for s in reversed(ends):
            after = rejected[s : s + 1]
            if s < shared or chosen[s - 1] != "\n" or (after and not after.isspace()):
                return s
        return 0

    def encode_rows(self, texts: list[tuple[str, str, str]], chat: list[bool]) -> list[tuple]:
        """(prompt_ids, chosen_row_ids, rejected_row_ids) of each (prompt, chosen row,
        rejected row) text triple; chat rows get no BOS (their template writes it)."""
        cuts = [self.split_point(t[0], t[1:]) for t in texts]
        pieces = []
        for (prompt, chosen, rejected), s in zip(texts, cuts, strict=True):
            pieces += [prompt[:s], prompt[s:], chosen[s:], rejected[s:]]
        ids = self.encode(pieces)
        raw = []
        for i in range(len(texts)):
            head, prompt, chosen, rejected = ids[4 * i : 4 * i + 4]
            raw.append((head + prompt, head + chosen, head + rejected))
        if self.split_ok and self.split_checked < 16 and any(cuts):
            self._check_split(texts, cuts, raw)
            if not self.split_ok:
                return self.encode_rows(texts, chat)
        return [r if c else tuple(map(self.with_bos, r)) for r, c in zip(raw, chat, strict=True)]

    def _check_split(self, texts, cuts, out) -> None:
        for text, s, triple in zip(texts, cuts, out, strict=True):
            if s and self.split_checked < 16:
                self.split_checked += 1
                if self.encode(list(text)) != list(triple):
                    self.split_ok = False  # this tokenizer does not encode segments alone
                    return


def _splits_at_newlines(fast) -> bool:
    """Whether a tokenizer is a regex byte-level one (GPT-2, Llama 3, Qwen, ...): no normalizer
    that sees across the text, and a pre-tokenizer that cuts before a word after a newline."""
    if fast is None or fast.normalizer is not None:
        return False
    try:
        state = json.loads(fast.pre_tokenizer.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return False
    parts = state.get("pretokenizers", [state])
    return any(p.get("type") == "ByteLevel" and p.get("use_regex") for p in parts) or (
        any(p.get("type") == "Split" for p in parts)
        and any(p.get("type") == "ByteLevel" for p in parts)
    )
