"""Turn caller items into token ids: chat templates, response spans, left-first truncation.

Three item kinds:

- ``ScoreItem(prompt=..., response=...)``: the tokenizer's chat template renders a user turn and an assistant turn
  (plain concatenation ``prompt + response`` when the tokenizer has no template);
- ``ScoreItem(messages=[...])``: the chat template is applied; the last message must be the assistant's response;
- ``ScoreItem(text=...)``: pre-formatted text used as is (``response_start`` may mark where the response begins).

The reward is read at the end, so truncation keeps the end: tokens are dropped from the left (the prompt first, then
the start of the response), never from the end of the response.

Example::

    fmt = Formatter(tokenizer, max_length=2048)
    enc = fmt.encode(ScoreItem(prompt="2+2?", response="4"), index=0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

from rewardkit.core.errors import InputError, ItemTooLongError


@dataclasses.dataclass(frozen=True)
class ScoreItem:
    """One thing to score. Exactly one of (prompt+response), messages, text is set."""

    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, str]] | None = None
    text: str | None = None
    response_start: int | None = None  # for ``text`` items: where the response begins (chars)
    # vLLM-compatible options: tokenizer special tokens on plain text (None: the default rule, added on ``text`` and
    # untemplated items, never on chat-templated ones, whose template carries them), and a per-item cap that keeps
    # only the last ``keep_last_tokens`` tokens (vLLM's ``truncate_prompt_tokens``; always truncates).
    add_special_tokens: bool | None = None
    keep_last_tokens: int | None = None


@dataclasses.dataclass(frozen=True)
class EncodedItem:
    """A formatted, tokenized, possibly truncated item.

    ``offsets[i]`` is the character span of token ``i`` in ``text``; ``(response_start, response_end)`` is the
    response's span in ``text``. ``response`` is the response string itself.
    """

    input_ids: tuple[int, ...]
    offsets: tuple[tuple[int, int], ...]
    text: str
    response_start: int
    response_end: int
    truncated: bool
    original_length: int

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def response(self) -> str:
        return self.text[self.response_start:self.response_end]

    def response_token_indices(self) -> list[int]:
        """Indices of tokens whose characters overlap the response (the keys ABC keeps)."""
        return [i for i, (s, e) in enumerate(self.offsets)
                if e > s and s < self.response_end and e > self.response_start]


def _locate(full: str, prefix: str, response: str) -> int:
    """Where ``response`` starts in ``full`` given the rendered prefix (prompt part)."""
    if full.startswith(prefix):
        tail = full[len(prefix):]
        if tail.startswith(response):
            return len(prefix)
        pos = full.find(response, len(prefix))
        if pos >= 0:
            return pos
    pos = full.rfind(response)
    return pos if pos >= 0 else len(prefix) if full.startswith(prefix) else 0


class Formatter:
    """Formats and tokenizes items for one reward model's tokenizer."""

    def __init__(self, tokenizer: Any, max_length: int = 2048, truncate: bool = True,
                 use_chat_template: bool | None = None) -> None:
        if max_length < 2:
            raise ValueError("max_length must be >= 2")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.truncate = truncate
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = has_template if use_chat_template is None else (use_chat_template and has_template)

    def render(self, item: ScoreItem, index: int = 0) -> tuple[str, int, int, bool]:
        """Return (text, response_start, response_end, templated)."""
        where = f"items[{index}]"
        if item.text is not None:
            start = item.response_start or 0
            if not 0 <= start <= len(item.text):
                raise InputError(f"{where}: response_start {start} is outside the text", field=f"{where}.response_start")
            return item.text, start, len(item.text), False
        if item.messages is not None:
            msgs = item.messages
            if not msgs or msgs[-1].get("role") != "assistant":
                raise InputError(f"{where}: the last message must have role 'assistant' (the response to score)",
                                 field=f"{where}.messages")
            return self._render_chat(msgs, where)
        if item.prompt is None or item.response is None:
            raise InputError(f"{where}: give prompt and response, messages, or text", field=where)
        if self.use_chat_template:
            return self._render_chat([{"role": "user", "content": item.prompt},
                                      {"role": "assistant", "content": item.response}], where)
        text = item.prompt + item.response
        return text, len(item.prompt), len(text), False

    def _render_chat(self, msgs: list[dict[str, str]], where: str) -> tuple[str, int, int, bool]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise InputError(f"{where}: this model's tokenizer has no chat template; send prompt/response or text",
                             field=f"{where}.messages")
        try:
            full = self.tokenizer.apply_chat_template(msgs, tokenize=False)
            prefix = self.tokenizer.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True) \
                if len(msgs) > 1 else ""
        except Exception as exc:  # template errors are the caller's message structure
            raise InputError(f"{where}: chat template failed: {exc}", field=f"{where}.messages") from exc
        response = msgs[-1].get("content") or ""
        start = _locate(full, prefix, response)
        return full, start, start + len(response), True

    def encode(self, item: ScoreItem, index: int = 0, truncate: bool | None = None) -> EncodedItem:
        text, rs, re_, templated = self.render(item, index)
        special = (not templated) if item.add_special_tokens is None else item.add_special_tokens
        enc = self.tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        n = len(ids)
        if n == 0:
            raise InputError(f"items[{index}]: the item is empty after formatting", field=f"items[{index}]")
        do_truncate = self.truncate if truncate is None else truncate
        truncated = False
        if item.keep_last_tokens is not None and 0 < item.keep_last_tokens < n:
            keep = min(item.keep_last_tokens, self.max_length)
            ids, offsets, truncated = ids[n - keep:], offsets[n - keep:], True
        elif n > self.max_length:
            if not do_truncate:
                raise ItemTooLongError(
                    f"items[{index}]: {n} tokens exceeds max_length={self.max_length} and truncation is off",
                    field=f"items[{index}]")
            ids = ids[n - self.max_length:]
            offsets = offsets[n - self.max_length:]
            truncated = True
        return EncodedItem(input_ids=tuple(ids), offsets=tuple(offsets), text=text,  # type: ignore[arg-type]
                           response_start=rs, response_end=re_, truncated=truncated, original_length=n)
