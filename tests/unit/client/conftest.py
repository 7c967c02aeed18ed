"""A fake rewardkit server for the client's unit tests, plugged in through ``httpx.MockTransport``.

It implements the request/response shapes of docs/api.md with a deterministic reward
(``len(text) / 10``), so the tests can check which item each reward came from.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np
import pytest

Handler = Callable[[httpx.Request], httpx.Response]


def item_text(item: dict[str, Any]) -> str:
    if "text" in item:
        return item["text"]
    if "messages" in item:
        return "".join(m["content"] for m in item["messages"])
    return item["prompt"] + item["response"]


def fake_reward(item: dict[str, Any]) -> float:
    return len(item_text(item)) / 10


def fake_token_rewards(item: dict[str, Any]) -> tuple[np.ndarray, list[str] | None, list[list[int]]]:
    """Per-character rewards over the response (or per caller span when given)."""
    response = item.get("response", item_text(item))
    if "response_token_spans" in item:
        spans = item["response_token_spans"]
        return np.float32([0.25 * (b - a) for a, b in spans]), None, spans
    vec = np.arange(len(response), dtype=np.float32) * np.float32(0.1) - np.float32(1 / 3)
    return vec, list(response), [[i, i + 1] for i in range(len(response))]


def rewards_body(payload: dict[str, Any]) -> dict[str, Any]:
    items = payload["items"]
    results = []
    for i, item in enumerate(items):
        dense = None
        if payload.get("dense"):
            vec, tokens, spans = fake_token_rewards(item)
            enc = payload.get("encoding_format", "base64")
            tr: Any = (
                base64.b64encode(vec.astype("<f4").tobytes()).decode() if enc == "base64" else vec.tolist()
            )
            dense = {
                "token_rewards": tr,
                "dtype": "float32",
                "tokens": tokens,
                "spans": spans,
                "beta": payload["beta"],
            }
        results.append(
            {"index": i, "reward": fake_reward(item), "num_tokens": 3, "truncated": False, "dense": dense}
        )
    return {
        "model": "fake-rm",
        "head_version": "base",
        "rewards": [fake_reward(it) for it in items],
        "results": results,
        "usage": {"total_tokens": 3 * len(items)},
    }


def error_response(status: int, type_: str, message: str, retry_after: str | None = None) -> httpx.Response:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    body = {"error": {"type": type_, "message": message, "field": None}}
    return httpx.Response(status, json=body, headers=headers)


class FakeServer:
    """Records every request; answers from ``script`` first (responses, exceptions or handlers)."""

    def __init__(self, script: list[Any] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.script = list(script or [])

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.content) for r in self.requests if r.content]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            step = self.script.pop(0)
            if isinstance(step, Exception):
                raise step
            if isinstance(step, httpx.Response):
                return step
            return step(request)
        return self.route(request)

    @staticmethod
    def route(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/rewards" and request.method == "POST":
            return httpx.Response(200, json=rewards_body(json.loads(request.content)))
        if path == "/v1/models":
            return httpx.Response(
                200, json={"object": "list", "data": [{"id": "fake-rm", "head_version": "base"}]}
            )
        if path == "/health":
            return httpx.Response(200, json={"status": "ok"})
        if path == "/ready":
            return httpx.Response(200, json={"status": "ready"})
        return error_response(404, "not_found", f"no route {path}")


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()
