"""A corpus of hostile inputs against every POST endpoint of the app (tiny Llama model, in process).

Each input must be answered with a 4xx carrying the one error schema (or a 200 where the input is legitimate),
never a 5xx, and the server must keep serving afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rewardkit.core.loading import load_reward_model
from rewardkit.server.app import create_app
from rewardkit.server.protocol import ErrorResponse
from rewardkit.server.settings import Settings

MAX_BODY = 200_000
MAX_CHARS = 5_000
SCORING = ["/v1/rewards", "/get_reward", "/pooling", "/classify"]


@pytest.fixture(scope="module")
def client(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    rm = load_reward_model(tiny_llama_dir)
    settings = Settings(model=str(tiny_llama_dir), state_dir=tmp_path_factory.mktemp("state"), max_length=64, max_batch_tokens=4096, max_body_bytes=MAX_BODY,
                        max_chars_per_item=MAX_CHARS, max_items_per_request=16)
    with TestClient(create_app(settings, rm=rm), raise_server_exceptions=False) as c:
        yield c


def _post_paths(client: TestClient) -> list[str]:
    """Every POST path of the app's own OpenAPI schema (path parameters filled with a dummy value)."""
    import re

    paths = client.app.openapi()["paths"]  # type: ignore[attr-defined]
    return sorted(re.sub(r"\{[^}]+\}", "x", p) for p, ops in paths.items() if "post" in ops)


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# name -> raw JSON body (sent as application/json to every endpoint)
CORPUS: dict[str, bytes] = {
    "deep_array": b'{"items": ' + _nested(10_000) + b"}",
    "deep_object": b'{"items": [' + b'{"a":' * 5_000 + b"1" + b"}" * 5_000 + b"]}",
    "deep_labels": b'{"query": ["q"], "labels": ' + _nested(800) + b"}",
    "huge_int": b'{"items": [{"text": "a"}], "beta": ' + b"9" * 5_000 + b"}",
    "huge_float": b'{"items": [{"text": "a"}], "beta": 1e999, "activation": 1e999}',
    "huge_negative": b'{"items": [{"text": "a"}], "beta": -1e308}',
    "nan": b'{"items": [{"text": "a"}], "beta": NaN, "input": "a", "activation": NaN}',
    "infinity": b'{"items": [{"text": "a"}], "beta": Infinity, "input": "a", "activation": -Infinity}',
    "nan_in_spans": b'{"items": [{"text": "a", "response_token_spans": [[NaN, 1]]}]}',
    "huge_span": b'{"items": [{"text": "ab", "response_token_spans": [[0, 99999999999999999999999]]}]}',
    "lone_surrogate_text": b'{"items": [{"text": "a\\ud800b"}], "query": ["\\udfff"], "input": "\\ud83d"}',
    "lone_surrogate_prompt": b'{"items": [{"prompt": "\\ud800", "response": "x"}], "input": ["ok", "\\udc00"]}',
    "lone_surrogate_messages": b'{"items": [{"messages": [{"role": "user", "content": "\\ud800"}, '
                               b'{"role": "assistant", "content": "x"}]}], '
                               b'"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\\udfff"}]}',
    "lone_surrogate_model": b'{"model": "\\ud800", "items": [{"text": "a"}], "input": "a"}',
    "nul_bytes": b'{"items": [{"text": "\\u0000\\u0000"}], "query": ["\\u0000"], "input": "\\u0000"}',
    "zero_length": b'{"items": [{"text": ""}], "query": [""], "input": ""}',
    "zero_length_pair": b'{"items": [{"prompt": "", "response": ""}], "input": [""]}',
    "over_chars": json.dumps({"items": [{"text": "x" * (MAX_CHARS + 1)}], "query": ["x" * (MAX_CHARS + 1)],
                              "input": "x" * (MAX_CHARS + 1)}).encode(),
    "over_body": json.dumps({"items": [{"text": "x" * (MAX_BODY + 10)}]}).encode(),
    "many_items": json.dumps({"items": [{"text": "a"}] * 17, "query": ["a"] * 17, "input": ["a"] * 17}).encode(),
    "wrong_types": b'{"items": {"text": "a"}, "query": "a", "input": 5, "messages": "x", "dense": "yes"}',
    "null_everything": b'{"items": null, "query": null, "input": null, "messages": null, "model": null}',
    "top_level_array": b"[]",
    "top_level_string": b'"hello"',
    "top_level_number": b"1e999",
    "empty_body": b"",
    "truncated_json": b'{"items": [{"text": "a',
    "trailing_garbage": b'{"items": [{"text": "a"}]} trailing',
    "invalid_utf8": b'{"items": [{"text": "\xff\xfe\xc3\x28"}], "query": ["\xc0\xaf"], "input": "\xed\xa0\x80"}',
    "utf16_body": '{"items": [{"text": "a"}]}'.encode("utf-16"),
    "bom": b'\xef\xbb\xbf{"items": [{"text": "a"}], "input": "a", "query": ["a"]}',
    "extra_fields": b'{"items": [{"text": "a", "path": "/etc/passwd"}], "model_path": "/tmp/x", "query": ["a"]}',
    "bad_role": b'{"items": [{"messages": [{"role": "root", "content": "x"}]}], '
                b'"messages": [{"role": "root", "content": "x"}]}',
    "duplicate_keys": b'{"items": [{"text": "a"}], "items": [{"text": "b"}], "input": "a", "input": "b"}',
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_hostile_json_never_500(client: TestClient, name: str) -> None:
    body = CORPUS[name]
    for path in _post_paths(client):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, (name, path, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = ErrorResponse.model_validate(r.json()).error  # the one error schema
            assert err.type and err.message
        if name.startswith("lone_surrogate") and path in SCORING:
            assert r.status_code == 422, (name, path, r.text)  # never scored
        if name == "over_body" and path in SCORING:  # (streamed R2M routes have their own stream limit)
            assert r.status_code == 413 and f"max_body_bytes={MAX_BODY}" in r.json()["error"]["message"]
    assert client.post("/v1/rewards", json={"items": [{"text": "still alive"}]}).status_code == 200


@pytest.mark.parametrize("name", ["over_chars", "many_items"])
def test_limits_name_the_limit_on_every_scoring_endpoint(client: TestClient, name: str) -> None:
    limit = f"max_chars_per_item={MAX_CHARS}" if name == "over_chars" else "max_items_per_request=16"
    texts = ["x" * (MAX_CHARS + 1)] if name == "over_chars" else ["a"] * 17
    bodies = {"/v1/rewards": {"items": [{"text": t} for t in texts]}, "/get_reward": {"query": texts},
              "/pooling": {"input": texts}, "/classify": {"input": texts}}
    for path in SCORING:
        r = client.post(path, json=bodies[path])
        assert r.status_code == 413 and limit in r.json()["error"]["message"], (path, r.text)


def test_surrogate_error_names_the_item(client: TestClient) -> None:
    r = client.post("/v1/rewards", content=b'{"items": [{"text": "ok"}, {"text": "bad \\ud800"}]}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 422
    err = ErrorResponse.model_validate(r.json()).error
    assert err.field == "items[1]" and "surrogate" in err.message


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded",
                                   "multipart/form-data; boundary=xyz", "application/octet-stream",
                                   "application/json; charset=latin-1", "", "application/xml"])
def test_wrong_content_types(client: TestClient, ctype: str) -> None:
    headers = {"content-type": ctype} if ctype else {}
    for body in (b'{"items": [{"text": "a"}]}', b"items=1&x=2", b"--xyz\r\n\r\n--xyz--", b"<a/>"):
        for path in _post_paths(client):
            r = client.post(path, content=body, headers=headers)
            assert r.status_code < 500, (ctype, path, body, r.text[:200])
            if r.status_code >= 400:
                ErrorResponse.model_validate(r.json())


def test_enormous_string_is_413_without_tokenizing(client: TestClient) -> None:
    """A string far over max_chars_per_item (but under the body limit) is refused before the tokenizer sees it."""
    r = client.post("/v1/rewards", json={"items": [{"prompt": "p" * 150_000, "response": "r"}]})
    assert r.status_code == 413 and r.json()["error"]["field"] == "items[0]"


def test_methods_and_unknown_paths(client: TestClient) -> None:
    assert client.get("/v1/rewards").status_code == 405
    assert client.put("/v1/rewards", json={}).status_code == 405
    r = client.get("/v1/../../etc/passwd")
    assert r.status_code == 404
    ErrorResponse.model_validate(r.json())


def _r2m_frame_paths(client: TestClient) -> list[str]:
    return [p for p in _post_paths(client) if "feedback" in p or "r2m" in p or "hidden" in p]


def test_truncated_binary_frames_to_r2m_endpoints(client: TestClient) -> None:
    """Truncated or corrupt RKF1 frames to any R2M/feedback endpoint: a 4xx, never a 500 (skipped until they exist)."""
    paths = _r2m_frame_paths(client)
    if not paths:
        pytest.skip("no R2M/feedback endpoint in this build")
    import numpy as np

    from rewardkit.core import wire

    frame = wire.encode_stream([({"group_id": "g", "index": 0, "round": 0}, np.zeros((3, 8), dtype="<f4"), "float32")])
    bodies = [frame[:k] for k in (0, 1, 3, 4, 7, 8, 16, len(frame) // 2, len(frame) - 1)]
    bodies += [b"RKF1" + b"\xff" * 12, b"RKF1" + (2**31).to_bytes(4, "little") * 4, b"\x00" * 100]
    for path in paths:
        for body in bodies:
            for ctype in ("application/octet-stream", "application/x-rewardkit-frames", "application/json"):
                r = client.post(path, content=body, headers={"content-type": ctype})
                assert r.status_code < 500, (path, ctype, body[:32], r.text[:200])
