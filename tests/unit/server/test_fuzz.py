"""Fuzzing: schemathesis against the app's own OpenAPI schema (tiny model, bounded examples), and Hypothesis
properties of formatting, truncation, span projection and the frame decoder not covered elsewhere.

Checks on every generated request: no 5xx, and a documented response matches its schema.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from rewardkit.core.errors import InputError
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.testing import make_tokenizer

TOK = make_tokenizer()
SCORING_OPS = ("POST /v1/rewards", "POST /get_reward", "POST /pooling", "POST /classify")


@pytest.fixture(scope="module")
def api_schema(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    """The app served by uvicorn in a thread on a free port (real HTTP, one lifespan), and its own schema."""
    import socket
    import threading
    import time

    import uvicorn

    from rewardkit.core.loading import load_reward_model
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    rm = load_reward_model(tiny_llama_dir)
    settings_ = Settings(model=str(tiny_llama_dir), state_dir=tmp_path_factory.mktemp("state"), max_length=64, max_batch_tokens=4096, max_items_per_request=16,
                         max_chars_per_item=4000, max_body_bytes=256_000, max_wait_ms=0)
    app = create_app(settings_, rm=rm)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    try:
        yield schemathesis.openapi.from_dict(app.openapi()), f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def _operations(api_schema: schemathesis.BaseSchema) -> list:  # type: ignore[type-arg]
    return [r.ok() for r in api_schema.get_all_operations()]


# schemathesis' pytest plugin does not run under pytest 9 here ('Function' has no '_nodeid'), so each operation's
# strategy is driven by Hypothesis directly: the same generated cases and the same checks.
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_api_no_server_errors_and_schema_conformance(api_schema: tuple[schemathesis.BaseSchema, str],
                                                     mode: schemathesis.GenerationMode) -> None:
    schema, url = api_schema
    ops = _operations(schema)
    paths = {op.path for op in ops}
    assert {"/v1/rewards", "/get_reward", "/pooling", "/classify", "/health", "/ready"} <= paths
    seen: dict[str, set[int]] = {}
    for op in ops:
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=25, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case: schemathesis.Case) -> None:
            resp = case.call_and_validate(base_url=url, checks=[not_a_server_error, response_schema_conformance,
                                                  content_type_conformance])
            seen.setdefault(case.operation.label, set()).add(resp.status_code)

        try:
            run()
        except Unsatisfiable:  # negative mode, an operation with no input to break (GET /health, POST .../pin)
            assert mode == schemathesis.GenerationMode.NEGATIVE and op.label not in SCORING_OPS, op.label
    assert all(max(codes) < 500 for codes in seen.values()), seen
    # schema-valid bodies can still break cross-field rules ("exactly one of prompt+response, messages, text"):
    # those are 422s; nothing else but success, a named limit (413) or a validation error may come back
    # (negative mode adds 400: a body that is not JSON at all)
    allowed = {200, 413, 422} | ({400} if mode == schemathesis.GenerationMode.NEGATIVE else set())
    for label in SCORING_OPS:
        assert seen[label] <= allowed, seen


# -- Hypothesis properties ------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(text=st.text(min_size=1, max_size=120), cut=st.floats(0, 1), max_length=st.integers(2, 48))
def test_text_items_keep_the_end_and_the_response_span(text: str, cut: float, max_length: int) -> None:
    start = int(cut * len(text))
    enc = Formatter(TOK, max_length=max_length, use_chat_template=False).encode(ScoreItem(text=text, response_start=start))
    full = TOK(text, add_special_tokens=False)["input_ids"]
    assert enc.text == text and (enc.response_start, enc.response_end) == (start, len(text))
    assert enc.num_tokens == min(len(full), max_length) and list(enc.input_ids) == full[len(full) - enc.num_tokens:]
    assert enc.truncated == (len(full) > max_length) and enc.original_length == len(full)


@settings(max_examples=40, deadline=None)
@given(turns=st.lists(st.text(max_size=40), min_size=1, max_size=4), response=st.text(max_size=60),
       max_length=st.integers(4, 80))
def test_chat_items_span_is_the_last_message(turns: list[str], response: str, max_length: int) -> None:
    msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    if msgs[-1]["role"] == "assistant":
        msgs.append({"role": "user", "content": "next"})
    msgs.append({"role": "assistant", "content": response})
    enc = Formatter(TOK, max_length=max_length).encode(ScoreItem(messages=msgs))
    assert enc.response == response
    assert enc.num_tokens <= max_length


@settings(max_examples=50, deadline=None)
@given(prompt=st.text(max_size=100), response=st.text(max_size=60), max_length=st.integers(2, 40))
def test_no_truncate_refuses_exactly_the_over_long(prompt: str, response: str, max_length: int) -> None:
    fmt = Formatter(TOK, max_length=max_length, truncate=False, use_chat_template=False)
    item = ScoreItem(prompt=prompt, response=response)
    n = len(TOK(prompt + response, add_special_tokens=False)["input_ids"])
    if n == 0:
        with pytest.raises(InputError):
            fmt.encode(item)
    elif n > max_length:
        with pytest.raises(InputError) as ei:
            fmt.encode(item, 3)
        assert ei.value.field == "items[3]" and f"max_length={max_length}" in str(ei.value)
    else:
        assert fmt.encode(item).num_tokens == n


@settings(max_examples=60, deadline=None)
@given(prompt=st.text(max_size=60), response=st.text(max_size=60), max_length=st.integers(2, 64))
def test_response_token_indices_are_exactly_the_overlapping_tokens(prompt: str, response: str, max_length: int) -> None:
    if not prompt + response:
        return
    enc = Formatter(TOK, max_length=max_length, use_chat_template=False).encode(ScoreItem(prompt=prompt, response=response))
    idx = set(enc.response_token_indices())
    for i, (s, e) in enumerate(enc.offsets):
        overlaps = e > s and s < enc.response_end and e > enc.response_start
        assert (i in idx) == overlaps


def _partition(n: int, cuts: list[int]) -> list[tuple[int, int]]:
    points = sorted({0, n, *(c % (n + 1) for c in cuts)})
    return [(a, b) for a, b in zip(points, points[1:], strict=False) if b > a]


@settings(max_examples=80, deadline=None)
@given(response=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=50),
       rm_cuts=st.lists(st.integers(0, 60), max_size=12), caller_cuts=st.lists(st.integers(0, 60), max_size=12),
       seed=st.integers(0, 2**16))
def test_span_projection_keeps_the_sum(response: str, rm_cuts: list[int], caller_cuts: list[int], seed: int) -> None:
    from rewardkit.core import abc

    n = len(response)
    rm_spans = _partition(n, rm_cuts)
    caller = abc.validate_spans(response, _partition(n, caller_cuts), "spans")  # any partition is valid
    rewards = np.random.default_rng(seed).normal(size=len(rm_spans))
    dense = abc.DenseResult(reward=float(rewards.sum()), token_rewards=rewards, spans=rm_spans,
                            tokens=[response[s:e] for s, e in rm_spans], weights=np.full(len(rm_spans), 1 / len(rm_spans)),
                            beta=1.0)
    out = abc.project_to_spans(dense, caller)
    assert out.shape == (len(caller),)
    assert out.sum() == pytest.approx(rewards.sum(), abs=1e-9)
    if caller == rm_spans:
        np.testing.assert_allclose(out, rewards, atol=1e-12)


@settings(max_examples=150, deadline=None)
@given(data=st.binary(max_size=300), prefix=st.booleans(), chunk=st.integers(1, 64))
def test_frame_decoder_only_raises_frame_errors(data: bytes, prefix: bool, chunk: int) -> None:
    from rewardkit.core import wire

    dec = wire.FrameDecoder(max_header_bytes=256, max_payload_bytes=4096, max_frames=8)
    stream = (wire.MAGIC if prefix else b"") + data
    try:
        for i in range(0, len(stream), chunk):
            dec.feed(stream[i:i + chunk])
        dec.close()
    except wire.FrameError as exc:
        assert isinstance(exc, InputError)  # the server maps it to a 4xx
