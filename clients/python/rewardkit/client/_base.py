"""Everything the sync and async clients share that does no I/O.

Request building (items from the several input kinds), splitting into chunks, response parsing,
endpoint selection (least outstanding items, cooldown after a connection error) and the retry
decision (exponential backoff with full jitter, ``Retry-After``, bounded attempts and total wait).
``RewardClient`` and ``AsyncRewardClient`` only add the I/O loop around these.
"""

from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
from pydantic import ValidationError

from rewardkit.client.errors import (
    APIError,
    NotReadyError,
    OverloadedError,
    ResponseFormatError,
    RewardKitError,
    TimeoutError,
    TransportError,
    parse_error,
)
from rewardkit.client.types import (
    ComponentInfo,
    ComposedReward,
    DenseReward,
    ModelInfo,
    Scores,
    _ModelList,
    _RewardsResponse,
    decode_float32,
)

logger = logging.getLogger("rewardkit.client")

__version__ = "0.1.0"

DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
DEFAULT_MAX_RETRIES = 5
DEFAULT_MAX_ITEMS_PER_REQUEST = 64
DEFAULT_MAX_CONCURRENCY = 8
DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "REWARDKIT_API_KEY"
URL_ENV = "REWARDKIT_URL"
RUN_ENV = "REWARDKIT_RUN"
_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,63}$")  # the server's rule (rewardkit.server.runs)

Item = dict[str, Any]
Spans = Sequence[Sequence[int]]


@dataclass
class _Endpoint:
    """One server URL and what the client knows about it."""

    url: str
    in_flight: int = 0  # items currently sent to it and not answered
    dead_until: float = 0.0  # time.monotonic() before which it is skipped

    def alive(self, now: float) -> bool:
        return self.dead_until <= now


@dataclass
class _RetryState:
    """Per-call retry bookkeeping."""

    attempt: int = 0  # retries done so far
    waited: float = 0.0  # seconds slept so far


def _normalise_urls(base_url: str | Sequence[str] | None) -> list[str]:
    if base_url is None:
        base_url = os.environ.get(URL_ENV) or DEFAULT_URL
    urls = base_url.split(",") if isinstance(base_url, str) else list(base_url)
    out = []
    for url in urls:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url: {url!r} must start with http:// or https://")
        out.append(url)
    if not out:
        raise ValueError("base_url: give at least one server URL")
    if len(set(out)) != len(out):
        raise ValueError(f"base_url: duplicate URLs in {out}")
    return out


def _check_positive(name: str, value: float, minimum: float = 0) -> None:
    if not value >= minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _coerce_timeout(timeout: httpx.Timeout | float | None) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:  # explicit opt-out of time limits; the default is bounded
        return httpx.Timeout(None)
    _check_positive("timeout", timeout, 1e-9)
    return httpx.Timeout(float(timeout), connect=min(5.0, float(timeout)))


class _BaseRewardClient:
    """Configuration and all non-I/O logic; see :class:`rewardkit.client.RewardClient`."""

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout: httpx.Timeout | float | None = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        max_retry_wait: float = 60.0,
        backoff_base: float = 0.5,
        backoff_max: float = 8.0,
        failover_cooldown: float = 10.0,
        max_items_per_request: int = DEFAULT_MAX_ITEMS_PER_REQUEST,
        headers: Mapping[str, str] | None = None,
        run_id: str | None = None,
        step: int | None = None,
        seed: int | None = None,
    ) -> None:
        self._endpoints = [_Endpoint(u) for u in _normalise_urls(base_url)]
        _check_positive("max_retries", max_retries)
        _check_positive("max_retry_wait", max_retry_wait)
        _check_positive("backoff_base", backoff_base)
        _check_positive("backoff_max", backoff_max)
        _check_positive("failover_cooldown", failover_cooldown)
        _check_positive("max_items_per_request", max_items_per_request, 1)
        self.model = model
        self.timeout = _coerce_timeout(timeout)
        self.max_retries = int(max_retries)
        self.max_retry_wait = float(max_retry_wait)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.failover_cooldown = float(failover_cooldown)
        self.max_items_per_request = int(max_items_per_request)
        api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
        self._headers = {"User-Agent": f"rewardkit-client/{__version__}", "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._headers.update(headers or {})
        run_id = run_id if run_id is not None else (os.environ.get(RUN_ENV) or None)
        if run_id is not None and not _RUN_ID_RE.match(run_id):
            raise ValueError(f"run_id: 1-64 characters of letters, digits and ._:/@+- (starting with a letter or "
                             f"digit), got {run_id!r}")
        self.run_id = run_id
        self.step = step
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # endpoint accounting may be touched from several threads
        self._rr = 0  # round-robin offset used to break ties between equally loaded endpoints

    @property
    def step(self) -> int | None:
        """The trainer step sent as ``x-rewardkit-step`` with every request (None: not sent)."""
        return self._step

    @step.setter
    def step(self, value: int | None) -> None:
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"step: an integer >= 0, got {value!r}")
            if self.run_id is None:
                raise ValueError("step: needs run_id (a step belongs to a run)")
        self._step = value

    @property
    def base_urls(self) -> list[str]:
        """The server URLs this client spreads requests over."""
        return [e.url for e in self._endpoints]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.base_urls!r})"

    # ------------------------------------------------------------------ request building
    @staticmethod
    def _build_items(
        items: Sequence[Mapping[str, Any]] | None,
        prompts: Sequence[str] | None,
        responses: Sequence[str] | None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None,
        texts: Sequence[str] | None,
    ) -> list[Item]:
        """Turn exactly one input kind into the API's item dicts, validating shapes."""
        given = [
            n
            for n, v in (
                ("items", items),
                ("prompts/responses", prompts if prompts is not None else responses),
                ("messages", messages),
                ("texts", texts),
            )
            if v is not None
        ]
        if len(given) != 1:
            raise TypeError(
                "give exactly one of items=, prompts= with responses=, messages= or texts=; "
                f"got {given or 'none'}"
            )
        kind = given[0]
        if kind == "items":
            assert items is not None
            return [_check_item(i, it) for i, it in enumerate(_as_list("items", items))]
        if kind == "prompts/responses":
            if prompts is None or responses is None:
                raise TypeError("prompts= and responses= must be given together")
            p, r = _as_list("prompts", prompts), _as_list("responses", responses)
            if len(p) != len(r):
                raise ValueError(f"prompts/responses: lengths differ ({len(p)} prompts, {len(r)} responses)")
            for name, seq in (("prompts", p), ("responses", r)):
                for i, s in enumerate(seq):
                    if not isinstance(s, str):
                        raise TypeError(f"{name}[{i}]: expected str, got {type(s).__name__}")
            return [{"prompt": a, "response": b} for a, b in zip(p, r, strict=True)]
        if kind == "messages":
            assert messages is not None
            return [_check_item(i, {"messages": m}) for i, m in enumerate(_as_list("messages", messages))]
        assert texts is not None
        out = []
        for i, t in enumerate(_as_list("texts", texts)):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}]: expected str, got {type(t).__name__}")
            out.append({"text": t})
        return out

    @staticmethod
    def _attach_spans(items: list[Item], response_token_spans: Sequence[Spans | None] | None) -> None:
        """Add per-item ``response_token_spans`` (policy-token character offsets) in place."""
        if response_token_spans is None:
            return
        spans = _as_list("response_token_spans", response_token_spans)
        if len(spans) != len(items):
            raise ValueError(
                f"response_token_spans: {len(spans)} entries for {len(items)} items; give one list per item"
            )
        for i, (item, s) in enumerate(zip(items, spans, strict=True)):
            if s is None:
                continue
            pairs = [[int(a), int(b)] for a, b in (_pair(i, j, p) for j, p in enumerate(s))]
            item["response_token_spans"] = pairs

    def _chunks(self, items: list[Item], size: int | None = None) -> list[list[Item]]:
        size = size or self.max_items_per_request
        return [items[i : i + size] for i in range(0, len(items), size)]

    def _score_body(self, chunk: list[Item], model: str | None, dense: bool, beta: float) -> dict[str, Any]:
        body: dict[str, Any] = {"items": chunk, "dense": dense}
        if dense:
            body["beta"] = beta
            body["encoding_format"] = "base64"
        model = model if model is not None else self.model
        if model is not None:
            body["model"] = model
        return body

    @staticmethod
    def _check_beta(beta: float) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta: must be within [0, 1], got {beta}")

    # ------------------------------------------------------------------ response parsing
    @staticmethod
    def _read_json(response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise ResponseFormatError(
                f"{response.request.url}: status {response.status_code} but the body is not JSON: "
                f"{response.text[:200]!r}"
            ) from exc

    @staticmethod
    def _parse_rewards_response(data: Any, n: int) -> _RewardsResponse:
        try:
            parsed = _RewardsResponse.model_validate(data)
        except ValidationError as exc:
            raise ResponseFormatError(f"/v1/rewards: unexpected response shape: {exc}") from exc
        if len(parsed.rewards) != n:
            raise ResponseFormatError(f"/v1/rewards: sent {n} items, got {len(parsed.rewards)} rewards")
        if parsed.results is not None:
            parsed.results.sort(key=lambda r: r.index)
            if [r.index for r in parsed.results] != list(range(n)):
                raise ResponseFormatError(f"/v1/rewards: result indices are not 0..{n - 1}")
        return parsed

    @classmethod
    def _parse_scores(cls, data: Any, n: int) -> Scores:
        parsed = cls._parse_rewards_response(data, n)
        if any(r is None for r in parsed.rewards):
            raise ResponseFormatError("/v1/rewards: a null reward in a single-model response")
        return Scores([float(r) for r in parsed.rewards if r is not None], model=parsed.model,
                      head_versions=[parsed.head_version] * n)

    @staticmethod
    def _compose_items(items: list[Item], rewards: Mapping[str, float],
                       references: Sequence[str | None] | None) -> dict[str, float]:
        """Check a composition's weights and attach ``references`` to the items in place."""
        if not isinstance(rewards, Mapping) or not rewards:
            raise ValueError("rewards: give a non-empty {name: weight} dict (GET /v1/models lists the names)")
        weights = {}
        for name, w in rewards.items():
            if not isinstance(name, str) or isinstance(w, bool) or not isinstance(w, int | float):
                raise TypeError(f"rewards[{name!r}]: expected str -> number, got {type(w).__name__}")
            weights[name] = float(w)
        if references is not None:
            refs = _as_list("references", references)
            if len(refs) != len(items):
                raise ValueError(f"references: {len(refs)} entries for {len(items)} items; give one per item")
            for i, (item, ref) in enumerate(zip(items, refs, strict=True)):
                if ref is not None and not isinstance(ref, str):
                    raise TypeError(f"references[{i}]: expected str or None, got {type(ref).__name__}")
                if ref is not None:
                    item["reference"] = ref
        return weights

    @classmethod
    def _parse_composed(cls, data: Any, n: int) -> list[ComposedReward]:
        parsed = cls._parse_rewards_response(data, n)
        if parsed.results is None:
            raise ResponseFormatError("/v1/rewards: a composed response has no results")
        return [ComposedReward(reward=None if r.reward is None else float(r.reward), components=dict(r.components or {}),
                               errors=dict(r.errors or {}), weights=dict(parsed.weights or {}), num_tokens=r.num_tokens,
                               model=parsed.model, head_version=parsed.head_version) for r in parsed.results]

    @classmethod
    def _parse_dense(cls, data: Any, chunk: list[Item]) -> list[DenseReward]:
        parsed = cls._parse_rewards_response(data, len(chunk))
        if parsed.results is None:
            raise ResponseFormatError("/v1/rewards: dense=true but the response has no results")
        out = []
        for item, res in zip(chunk, parsed.results, strict=True):
            if res.dense is None:
                raise ResponseFormatError(f"/v1/rewards: results[{res.index}].dense is missing")
            if res.dense.dtype != "float32":
                raise ResponseFormatError(
                    f"results[{res.index}].dense.dtype: expected float32, got {res.dense.dtype}"
                )
            vec = decode_float32(res.dense.token_rewards, f"results[{res.index}].dense.token_rewards")
            raw_spans = res.dense.spans if res.dense.spans is not None else item.get("response_token_spans")
            if raw_spans is None:
                spans = np.empty((0, 2), dtype=np.int64)
            else:
                spans = np.asarray(raw_spans, dtype=np.int64).reshape(-1, 2)  # (n, 2)
                if spans.shape[0] != vec.shape[0]:
                    raise ResponseFormatError(
                        f"results[{res.index}].dense: {vec.shape[0]} token rewards but {spans.shape[0]} spans"
                    )
            out.append(
                DenseReward(reward=float(res.reward), token_rewards=vec, tokens=res.dense.tokens, spans=spans,
                            model=parsed.model, head_version=parsed.head_version)
            )
        return out

    @staticmethod
    def _parse_model_list(data: Any) -> _ModelList:
        try:
            return _ModelList.model_validate(data)
        except ValidationError as exc:
            raise ResponseFormatError(f"/v1/models: unexpected response shape: {exc}") from exc

    @classmethod
    def _parse_components(cls, data: Any) -> list[ComponentInfo]:
        return cls._parse_model_list(data).components

    @classmethod
    def _parse_models(cls, data: Any) -> list[ModelInfo]:
        return cls._parse_model_list(data).data

    # ------------------------------------------------------------------ endpoints
    def _acquire(self, weight: int) -> _Endpoint:
        """Pick the live endpoint with the fewest in-flight items and count ``weight`` on it.

        Ties go round-robin, so a sequential caller still spreads over all URLs. When every
        endpoint is cooling down, the one whose cooldown ends first is tried anyway.
        """
        with self._lock:
            now = time.monotonic()
            n = len(self._endpoints)
            order = [self._endpoints[(self._rr + k) % n] for k in range(n)]
            self._rr = (self._rr + 1) % n
            alive = [e for e in order if e.alive(now)]
            ep = min(alive, key=lambda e: e.in_flight) if alive else min(order, key=lambda e: e.dead_until)
            ep.in_flight += weight
            return ep

    def _release(self, ep: _Endpoint, weight: int) -> None:
        with self._lock:
            ep.in_flight -= weight
            assert ep.in_flight >= 0, ep

    def _mark_dead(self, ep: _Endpoint) -> None:
        with self._lock:
            ep.dead_until = time.monotonic() + self.failover_cooldown

    def _mark_alive(self, ep: _Endpoint) -> None:
        if ep.dead_until:
            with self._lock:
                ep.dead_until = 0.0

    def _another_alive(self, ep: _Endpoint) -> bool:
        now = time.monotonic()
        return any(e is not ep and e.alive(now) for e in self._endpoints)

    # ------------------------------------------------------------------ errors and retries
    def _transport_error(self, ep: _Endpoint, url: str, exc: httpx.TransportError) -> TransportError:
        """Map an httpx transport failure; connection-level failures put ``ep`` on cooldown."""
        if isinstance(exc, httpx.TimeoutException):
            phase = {
                httpx.ConnectTimeout: "connect",
                httpx.ReadTimeout: "read",
                httpx.WriteTimeout: "write",
                httpx.PoolTimeout: "pool",
            }.get(type(exc), "read")
            err: TransportError = TimeoutError(f"{phase} timeout on {url}: {exc}", url=url, phase=phase)
        else:
            err = TransportError(f"{type(exc).__name__} on {url}: {exc}", url=url)
        err.__cause__ = exc
        if _retryable(err):
            self._mark_dead(ep)
        return err

    def _request_kwargs(self, body: Any, content: bytes | None, params: Mapping[str, str] | None,
                        headers: Mapping[str, str] | None, timeout: httpx.Timeout | None) -> dict[str, Any]:
        """httpx keyword arguments of one request: JSON ``body`` or binary ``content`` (octet-stream)."""
        hdrs = dict(self._headers)
        if self.run_id is not None:
            hdrs["x-rewardkit-run"] = self.run_id
            if self._step is not None:
                hdrs["x-rewardkit-step"] = str(self._step)
        kw: dict[str, Any] = {"timeout": timeout or self.timeout}
        if content is not None:
            hdrs["Content-Type"] = "application/octet-stream"
            kw["content"] = content
        else:
            kw["json"] = body
        hdrs.update(headers or {})
        kw["headers"] = hdrs
        if params:
            kw["params"] = dict(params)
        return kw

    @staticmethod
    def _api_error(response: httpx.Response) -> APIError:
        return parse_error(response.status_code, response.content, headers=response.headers)

    def _retry_delay(self, state: _RetryState, err: RewardKitError, ep: _Endpoint) -> float | None:
        """Seconds to wait before the next attempt, or ``None`` when ``err`` must be raised now."""
        err.attempts = state.attempt + 1
        if not _retryable(err) or state.attempt >= self.max_retries:
            return None
        state.attempt += 1
        if isinstance(err, TransportError) and self._another_alive(ep):
            delay = 0.0  # fail over to another URL right away
        elif isinstance(err, APIError) and err.retry_after is not None:
            delay = err.retry_after
        else:  # exponential backoff with full jitter
            delay = self._rng.uniform(
                0.0, min(self.backoff_max, self.backoff_base * 2 ** (state.attempt - 1))
            )
        if state.waited + delay > self.max_retry_wait:
            logger.warning(
                "giving up url=%s error=%s waited=%.2fs next_delay=%.2fs max_retry_wait=%.2fs",
                ep.url,
                type(err).__name__,
                state.waited,
                delay,
                self.max_retry_wait,
            )
            return None
        state.waited += delay
        logger.info(
            "retrying url=%s error=%s attempt=%d delay=%.3fs",
            ep.url,
            type(err).__name__,
            state.attempt,
            delay,
        )
        return delay


def _retryable(err: RewardKitError) -> bool:
    """Connection errors, 429 and 503 only; never other 4xx/5xx, never read timeouts."""
    if isinstance(err, TimeoutError):
        return err.phase == "connect"
    return isinstance(err, TransportError | OverloadedError | NotReadyError)


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise TypeError(f"{name}: expected a list, got {type(value).__name__}")
    return list(value)


def _pair(i: int, j: int, p: Any) -> tuple[int, int]:
    if not isinstance(p, Sequence) or len(p) != 2:
        raise ValueError(f"response_token_spans[{i}][{j}]: expected [start, end], got {p!r}")
    a, b = int(p[0]), int(p[1])
    if not 0 <= a <= b:
        raise ValueError(f"response_token_spans[{i}][{j}]: need 0 <= start <= end, got [{a}, {b}]")
    return a, b


def _check_item(i: int, item: Any) -> Item:
    """Validate one item: exactly {prompt, response}, {messages} or {text} (+ response_token_spans, reference)."""
    if not isinstance(item, Mapping):
        raise TypeError(f"items[{i}]: expected a dict, got {type(item).__name__}")
    ref = item.get("reference")
    if ref is not None and not isinstance(ref, str):
        raise TypeError(f"items[{i}].reference: expected str, got {type(ref).__name__}")
    keys = set(item) - {"response_token_spans", "reference"}
    if keys == {"text"}:
        if not isinstance(item["text"], str):
            raise TypeError(f"items[{i}].text: expected str, got {type(item['text']).__name__}")
    elif keys == {"prompt", "response"}:
        for k in ("prompt", "response"):
            if not isinstance(item[k], str):
                raise TypeError(f"items[{i}].{k}: expected str, got {type(item[k]).__name__}")
    elif keys == {"messages"}:
        msgs = item["messages"]
        if isinstance(msgs, str) or not isinstance(msgs, Sequence) or not msgs:
            raise ValueError(f"items[{i}].messages: expected a non-empty list of {{role, content}} dicts")
        for j, m in enumerate(msgs):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise ValueError(f"items[{i}].messages[{j}]: expected a {{role, content}} dict, got {m!r}")
    else:
        raise ValueError(
            f"items[{i}]: expected keys {{prompt, response}}, {{messages}} or {{text}}; got {sorted(keys)}"
        )
    return dict(item)
