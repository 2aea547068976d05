"""Text -> token ids for tokenization: chat templates rendered and texts encoded many rows at
a time, the same way for prompts and whole rows (see `Encoder`)."""

from __future__ import annotations

from pathlib import Path

from mlx_dpo.data_files import DataError
from mlx_dpo.token_ids import RowEncoder

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

    Chat templates are rendered a batch of conversations per call (plain conversations
    straight through the compiled template: `DirectRender`); texts are encoded by
    `token_ids.RowEncoder`, which encodes what a prompt and its rows share once and each
    distinct word once, both checked against the tokenizer itself.
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
        self.direct = None if self.per_row else DirectRender.of(hf, self.template)
        self.rows = RowEncoder.for_tokenizer(hf)
        self.bos_id = self.rows.bos_id

    def text(self, text: str) -> list[int]:
        return self.rows.with_bos(self.rows.encode([text])[0])

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.rows.encode(texts)

    def render(
        self, conversations: list[list[dict]], add_generation_prompt: bool, tools=None
    ) -> list[str]:
        """Rendered chat texts; raises TemplateError/ValueError for a bad conversation."""
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        if tools:
            kwargs["tools"] = tools
        if self.per_row:
            return [self.tokenizer.apply_chat_template(c, **kwargs) for c in conversations]
        if self.direct is not None and not tools and all(map(_plain, conversations)):
            out = self.direct.render(conversations, add_generation_prompt, self.template_kwargs)
            if self.direct.checked[add_generation_prompt] < 32:  # against transformers itself
                n = min(len(out), 32 - self.direct.checked[add_generation_prompt])
                self.direct.checked[add_generation_prompt] += n
                if out[:n] != self._render(conversations[:n], kwargs):
                    self.direct = None
                    return self._render(conversations, kwargs)
            return out
        return self._render(conversations, kwargs)

    def _render(self, conversations: list[list[dict]], kwargs: dict) -> list[str]:
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


def _plain(conversation: list[dict]) -> bool:
    return all(
        type(m) is dict and m.keys() <= {"role", "content"} and type(m.get("content")) is str
        for m in conversation
    )


class DirectRender:
    """Renders conversations of plain messages (a role and a text content, nothing else)
    straight through the compiled Jinja template: what transformers' `apply_chat_template`
    does with them once its per-message conversions (which cost about half of a render, and
    change nothing in such messages) are done. `Encoder` checks it against
    `apply_chat_template` on the first conversations of each kind and stops using it if they
    ever differ."""

    def __init__(self, compiled, context: dict):
        self.compiled, self.context = compiled, context
        self.checked = {True: 0, False: 0}  # conversations checked, per add_generation_prompt

    @classmethod
    def of(cls, hf, template: str | None) -> DirectRender | None:
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            source = hf.get_chat_template(template)
            return cls(_compile_jinja_template(source), dict(hf.special_tokens_map))
        except Exception:  # noqa: BLE001 - no template, or another transformers: the usual way
            return None

    def render(self, conversations, add_generation_prompt: bool, kwargs: dict) -> list[str]:
        context = {**self.context, **kwargs}
        return [
            self.compiled.render(
                messages=[dict(m) for m in c],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **context,
            )
            for c in conversations
        ]
