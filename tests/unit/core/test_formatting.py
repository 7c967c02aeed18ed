"""Formatting, response spans and left-first truncation (incl. Hypothesis properties)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewardkit.core.errors import InputError, ItemTooLongError
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.testing import make_tokenizer

TOK = make_tokenizer()
TOK_PLAIN = make_tokenizer(chat_template=False)


def test_plain_concat_without_template() -> None:
    fmt = Formatter(TOK_PLAIN, max_length=512)
    enc = fmt.encode(ScoreItem(prompt="Q: 2+2? A:", response=" 4"))
    assert enc.text == "Q: 2+2? A: 4" and enc.response == " 4"


def test_messages_need_assistant_last_and_template() -> None:
    with pytest.raises(InputError) as ei:
        Formatter(TOK).encode(ScoreItem(messages=[{"role": "user", "content": "hi"}]), index=3)
    assert ei.value.field == "items[3].messages"
    with pytest.raises(InputError, match="no chat template"):
        Formatter(TOK_PLAIN).encode(ScoreItem(messages=[{"role": "user", "content": "a"},
                                                        {"role": "assistant", "content": "b"}]))


def test_truncation_cuts_left_and_keeps_response_end() -> None:
    fmt = Formatter(TOK, max_length=20)
    enc = fmt.encode(ScoreItem(prompt="long prompt words " * 50, response="the final answer is 42"))
    assert enc.truncated and enc.num_tokens == 20 and enc.original_length > 20
    tail = TOK.decode(list(enc.input_ids))
    assert "the final answer is 42" in tail
    with pytest.raises(ItemTooLongError) as ei:
        Formatter(TOK, max_length=20, truncate=False).encode(ScoreItem(prompt="x " * 100, response="y"), index=7)
    assert ei.value.field == "items[7]" and "max_length=20" in str(ei.value)


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(min_size=0, max_size=80), response=st.text(min_size=1, max_size=80),
       max_length=st.integers(min_value=4, max_value=64))
def test_properties(prompt: str, response: str, max_length: int) -> None:
    fmt = Formatter(TOK, max_length=max_length)
    enc = fmt.encode(ScoreItem(prompt=prompt, response=response))
    assert enc.num_tokens <= max_length
    assert enc.text[enc.response_start:enc.response_end] == response  # the span is the response
    # the last token of the full tokenization is always kept (truncation never cuts the end)
    full = TOK(enc.text, add_special_tokens=False)["input_ids"]
    assert list(enc.input_ids) == full[len(full) - enc.num_tokens:]
    assert enc.truncated == (len(full) > max_length)
    for s, e in enc.offsets:
        assert 0 <= s <= e <= len(enc.text)
