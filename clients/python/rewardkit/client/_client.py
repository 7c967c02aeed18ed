"""``RewardClient`` (blocking) and ``AsyncRewardClient`` (asyncio): the I/O around ``_BaseRewardClient``.

The two classes have the same methods with the same arguments; only the I/O differs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import httpx

from rewardkit.client._base import (
    DEFAULT_MAX_CONCURRENCY,
    Item,
    Spans,
    _BaseRewardClient,
    _coerce_timeout,
    _RetryState,
)
from rewardkit.client.errors import NotReadyError, TimeoutError
from rewardkit.client.frames import encode_rewards_body
from rewardkit.client.stream import FeedbackStream
from rewardkit.client.types import ComponentInfo, ComposedReward, DenseReward, ModelInfo, Scores

__all__ = ["AsyncRewardClient", "RewardClient"]

T = TypeVar("T")

_CLIENT_DOC = """
    Args:
        base_url: one server URL, a list of them, or a comma-separated string; default
            ``$REWARDKIT_URL`` or ``http://127.0.0.1:8000``. With several URLs each request goes to the
            one with the fewest in-flight items, and a URL that refuses connections is skipped for
            ``failover_cooldown`` seconds.
        api_key: sent as ``Authorization: Bearer``; default ``$REWARDKIT_API_KEY``.
        model: default model id sent with every request (the server checks it matches).
        timeout: an ``httpx.Timeout`` or seconds; default connect 5 s, read/write/pool 120 s.
        max_retries: retries after the first attempt (connection errors, 429 and 503 only).
        max_retry_wait: the most seconds one call may spend sleeping between retries.
        backoff_base, backoff_max: full-jitter backoff: sleep ~U(0, min(max, base * 2**k)) unless the
            server sent ``Retry-After``.
        failover_cooldown: seconds a URL that refused a connection is skipped.
        max_items_per_request: longer inputs are split into several requests, results kept in order.
        headers: extra HTTP headers.
        run_id: the training run these rewards are for: sent as ``x-rewardkit-run`` on every request, so a
            server shared by several runs watches each run's drift apart (``GET /v1/drift?run=...``). Default
            ``$REWARDKIT_RUN``. 1-64 characters of letters, digits and ``._:/@+-``.
        step: the trainer's step, sent as ``x-rewardkit-step`` (needs ``run_id``); set ``client.step = n`` as
            training advances.
        seed: seeds the backoff jitter (tests).
        transport: an httpx transport (e.g. ``httpx.MockTransport``) for the internal httpx client.
        http_client: a ready httpx client to use instead (its transport/mounts/proxies are used; the
            rewardkit client does not close it).
"""


class RewardClient(_BaseRewardClient):
    """Blocking client for a rewardkit server.

    Example::

        with RewardClient("http://localhost:8000") as rk:
            rk.score(prompts=["What is 2+2?"], responses=["4."])         # -> [1.27]
            rk.score(messages=[[{"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello!"}]])
            dense = rk.score_dense(texts=["<|im_start|>user ..."])[0]    # DenseReward
    """

    __doc__ = (__doc__ or "") + _CLIENT_DOC

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        http_client: httpx.Client | None = None,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        if http_client is not None and transport is not None:
            raise TypeError("give transport= or http_client=, not both")
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.Client(transport=transport)

    # ------------------------------------------------------------------ public API
    def score(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
    ) -> Scores:
        """Scalar rewards, one per input, in input order, as :class:`~rewardkit.client.Scores` (a ``list[float]``
        that also carries ``model`` and ``head_version``).

        Give exactly one input kind: ``items`` (dicts ``{prompt, response}``, ``{messages}`` or
        ``{text}``), ``prompts`` with ``responses``, ``messages`` (conversations) or ``texts``
        (already formatted, chat template applied).

        Example::

            >>> rk.score(prompts=["2+2?", "2+2?"], responses=["4", "5"])
            [1.9, -0.7]
        """
        all_items = self._build_items(items, prompts, responses, messages, texts)
        return self._score_items(all_items, model=model)

    def score_dense(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        beta: float = 0.8,
        response_token_spans: Sequence[Spans | None] | None = None,
    ) -> list[DenseReward]:
        """Scalar reward plus token-level (ABC) rewards per input.

        Args:
            beta: share of the reward redistributed over tokens by attention (the rest stays on the
                last token); 0 gives a sparse reward, 1 fully dense.
            response_token_spans: per item, ``[[start, end], ...]`` character offsets of *your policy's*
                tokens in the response; the server then returns one reward per policy token.

        Example::

            >>> d = rk.score_dense(prompts=["2+2?"], responses=["4"], response_token_spans=[[[0, 1]]])[0]
            >>> d.token_rewards.shape
            (1,)
        """
        self._check_beta(beta)
        all_items = self._build_items(items, prompts, responses, messages, texts)
        self._attach_spans(all_items, response_token_spans)
        out: list[DenseReward] = []
        for chunk in self._chunks(all_items):
            body = self._score_body(chunk, model, dense=True, beta=beta)
            out.extend(self._parse_dense(self._request("POST", "/v1/rewards", body, len(chunk)), chunk))
        return out

    def compose(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        rewards: Mapping[str, float],
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        references: Sequence[str | None] | None = None,
    ) -> list[ComposedReward]:
        """Several reward signals in one request: ``rewards={name: weight}`` over the server's models
        (``default`` = its first) and components (``length_penalty``, ``regex``, ``exact_match``,
        ``numeric_match``; :meth:`components` lists them). Each item's ``reward`` is the weighted sum, its parts
        are in ``components``; an item a part cannot score has ``reward=None`` and the reason in ``errors``.

        Args:
            references: per item, the reference answer the match components compare with (or ``None``).

        Example::

            >>> c = rk.compose(prompts=["2+2?"], responses=["\\boxed{4}"], references=["4"],
            ...                rewards={"default": 1.0, "numeric_match": 2.0})[0]
            >>> c.components["numeric_match"]
            1.0
        """
        all_items = self._build_items(items, prompts, responses, messages, texts)
        weights = self._compose_items(all_items, rewards, references)
        out: list[ComposedReward] = []
        for chunk in self._chunks(all_items):
            data = self._request("POST", "/v1/rewards", {"items": chunk, "rewards": weights}, len(chunk))
            out.extend(self._parse_composed(data, len(chunk)))
        return out

    def components(self) -> list[ComponentInfo]:
        """The reward components the server offers for :meth:`compose` (``GET /v1/models``)."""
        return self._parse_components(self._request("GET", "/v1/models"))

    def models(self) -> list[ModelInfo]:
        """The models the server serves (``GET /v1/models``)."""
        return self._parse_models(self._request("GET", "/v1/models"))

    def health(self) -> dict[str, Any]:
        """``GET /health``: liveness of one server (raises when none answers)."""
        data = self._request("GET", "/health")
        return dict(data) if isinstance(data, Mapping) else {"status": data}

    def ready(self) -> bool:
        """True when at least one server URL answers ``/ready`` with 200 (no retries)."""
        for ep in self._endpoints:
            try:
                response = self._http.get(ep.url + "/ready", headers=self._headers, timeout=self.timeout)
            except httpx.TransportError:
                continue
            if response.is_success:
                return True
            err = self._api_error(response)
            if not isinstance(err, NotReadyError):
                raise err
        return False

    def wait_until_ready(self, timeout: float = 300.0, poll_interval: float = 1.0) -> None:
        """Block until :meth:`ready` is true; raise :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() + poll_interval > deadline:
                raise TimeoutError(f"no server ready after {timeout:.0f} s: {self.base_urls}", phase="ready")
            time.sleep(poll_interval)

    # -- R2M (rewardkit.client.feedback; docs/r2m.md) --------------------------------------------------------
    def r2m_rewards(self, group_ids: Sequence[str], indices: Sequence[int], round: int, hidden: Sequence[Any],
                    items: Sequence[Mapping[str, Any]], *, dtype: str = "bfloat16", max_positions: int | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """R2M rewards for items with their policy hidden states (``POST /v1/r2m/rewards``), through this client's
        request path (failover, bounded ``Retry-After``, typed errors). Returns the parsed response."""
        body = encode_rewards_body(group_ids, indices, round, hidden, items, dtype, max_positions)
        return self._request("POST", "/v1/r2m/rewards", content=body, weight=max(1, len(items)),  # type: ignore[no-any-return]
                             timeout=None if timeout is None else _coerce_timeout(timeout))

    def stream_feedback(self, *, transport: httpx.BaseTransport | None = None, max_retries: int | None = None,
                        timeout: float | None = None, **options: Any) -> FeedbackStream:
        """A :class:`rewardkit.client.stream.FeedbackStream` that sends through this client (or through a twin with
        its URLs and key when ``transport``, ``max_retries`` or ``timeout`` differ). ``options``: dtype,
        max_positions, batch_frames, max_queue, linger_s."""
        client, owned = sync_twin(self, transport=transport, max_retries=max_retries, timeout=timeout)
        return FeedbackStream(client, owns_client=owned, **options)
    # -- end R2M ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the connection pool (only when this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ I/O
    def _score_items(self, items: list[Item], *, model: str | None = None, split: bool = True) -> Scores:
        """Score ready-made items; ``split=False`` sends them in one request (used by the adapters)."""
        out = Scores()
        for chunk in self._chunks(items, None if split else max(1, len(items))):
            body = self._score_body(chunk, model, dense=False, beta=0.0)
            out.extend_from(self._parse_scores(self._request("POST", "/v1/rewards", body, len(chunk)), len(chunk)))
        return out

    def _request(self, method: str, path: str, body: Any = None, weight: int = 1, *, content: bytes | None = None,
                 params: Mapping[str, str] | None = None, headers: Mapping[str, str] | None = None,
                 timeout: httpx.Timeout | None = None) -> Any:
        """Send with endpoint selection, failover and bounded retries; return the decoded JSON body. ``content``:
        a binary body (R2M's RKF1 streams), replayed as is on a retry."""
        state = _RetryState()
        kw = self._request_kwargs(body, content, params, headers, timeout)
        while True:
            ep = self._acquire(weight)
            url = ep.url + path
            try:
                response = self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                err: Any = self._transport_error(ep, url, exc)
            else:
                self._mark_alive(ep)
                if response.is_success:
                    return self._read_json(response)
                err = self._api_error(response)
            finally:
                self._release(ep, weight)
            delay = self._retry_delay(state, err, ep)
            if delay is None:
                raise err
            time.sleep(delay)


class AsyncRewardClient(_BaseRewardClient):
    """asyncio client for a rewardkit server; same methods as :class:`RewardClient`, awaited.

    Inputs longer than ``max_items_per_request`` are sent as concurrent requests, at most
    ``max_concurrency`` at a time per call.

    Example::

        async with AsyncRewardClient(["http://a:8000", "http://b:8000"]) as rk:
            rewards = await rk.score(texts=texts)
    """

    __doc__ = (
        (__doc__ or "") + _CLIENT_DOC + "        max_concurrency: requests in flight at once for one call.\n"
    )

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        http_client: httpx.AsyncClient | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        **options: Any,
    ) -> None:
        super().__init__(base_url, **options)
        if http_client is not None and transport is not None:
            raise TypeError("give transport= or http_client=, not both")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency: must be >= 1, got {max_concurrency}")
        self.max_concurrency = int(max_concurrency)
        self._owns_http = http_client is None
        self._http = http_client if http_client is not None else httpx.AsyncClient(transport=transport)

    # ------------------------------------------------------------------ public API
    async def score(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
    ) -> Scores:
        """Scalar rewards, one per input, in input order (see :meth:`RewardClient.score`)."""
        all_items = self._build_items(items, prompts, responses, messages, texts)
        return await self._score_items(all_items, model=model)

    async def score_dense(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        model: str | None = None,
        beta: float = 0.8,
        response_token_spans: Sequence[Spans | None] | None = None,
    ) -> list[DenseReward]:
        """Scalar plus token-level rewards per input (see :meth:`RewardClient.score_dense`)."""
        self._check_beta(beta)
        all_items = self._build_items(items, prompts, responses, messages, texts)
        self._attach_spans(all_items, response_token_spans)

        async def one(chunk: list[Item]) -> list[DenseReward]:
            body = self._score_body(chunk, model, dense=True, beta=beta)
            return self._parse_dense(await self._request("POST", "/v1/rewards", body, len(chunk)), chunk)

        parts = await self._map_bounded(one, self._chunks(all_items))
        return [d for part in parts for d in part]

    async def compose(
        self,
        items: Sequence[Mapping[str, Any]] | None = None,
        *,
        rewards: Mapping[str, float],
        prompts: Sequence[str] | None = None,
        responses: Sequence[str] | None = None,
        messages: Sequence[Sequence[Mapping[str, Any]]] | None = None,
        texts: Sequence[str] | None = None,
        references: Sequence[str | None] | None = None,
    ) -> list[ComposedReward]:
        """Weighted sum of models and components per item, with the parts (see :meth:`RewardClient.compose`)."""
        all_items = self._build_items(items, prompts, responses, messages, texts)
        weights = self._compose_items(all_items, rewards, references)

        async def one(chunk: list[Item]) -> list[ComposedReward]:
            data = await self._request("POST", "/v1/rewards", {"items": chunk, "rewards": weights}, len(chunk))
            return self._parse_composed(data, len(chunk))

        parts = await self._map_bounded(one, self._chunks(all_items))
        return [c for part in parts for c in part]

    async def components(self) -> list[ComponentInfo]:
        """The reward components the server offers (see :meth:`RewardClient.components`)."""
        return self._parse_components(await self._request("GET", "/v1/models"))

    async def models(self) -> list[ModelInfo]:
        """The models the server serves (``GET /v1/models``)."""
        return self._parse_models(await self._request("GET", "/v1/models"))

    async def health(self) -> dict[str, Any]:
        """``GET /health``: liveness of one server (raises when none answers)."""
        data = await self._request("GET", "/health")
        return dict(data) if isinstance(data, Mapping) else {"status": data}

    async def ready(self) -> bool:
        """True when at least one server URL answers ``/ready`` with 200 (no retries)."""
        for ep in self._endpoints:
            try:
                response = await self._http.get(
                    ep.url + "/ready", headers=self._headers, timeout=self.timeout
                )
            except httpx.TransportError:
                continue
            if response.is_success:
                return True
            err = self._api_error(response)
            if not isinstance(err, NotReadyError):
                raise err
        return False

    async def wait_until_ready(self, timeout: float = 300.0, poll_interval: float = 1.0) -> None:
        """Wait until :meth:`ready` is true; raise :class:`TimeoutError` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not await self.ready():
            if time.monotonic() + poll_interval > deadline:
                raise TimeoutError(f"no server ready after {timeout:.0f} s: {self.base_urls}", phase="ready")
            await asyncio.sleep(poll_interval)

    # -- R2M (rewardkit.client.feedback; docs/r2m.md) --------------------------------------------------------
    async def r2m_rewards(self, group_ids: Sequence[str], indices: Sequence[int], round: int, hidden: Sequence[Any],
                          items: Sequence[Mapping[str, Any]], *, dtype: str = "bfloat16",
                          max_positions: int | None = None, timeout: float | None = None) -> dict[str, Any]:
        """R2M rewards for items with their policy hidden states (``POST /v1/r2m/rewards``); see the sync client."""
        body = encode_rewards_body(group_ids, indices, round, hidden, items, dtype, max_positions)
        return await self._request("POST", "/v1/r2m/rewards", content=body,  # type: ignore[no-any-return]
                                   weight=max(1, len(items)),
                                   timeout=None if timeout is None else _coerce_timeout(timeout))

    def stream_feedback(self, *, transport: httpx.BaseTransport | None = None, max_retries: int | None = None,
                        timeout: float | None = None, **options: Any) -> FeedbackStream:
        """A :class:`rewardkit.client.stream.FeedbackStream` to this client's URLs with its headers and retry policy.
        The stream sends from its own thread through a sync twin of this client; ``add`` blocks only while the send
        queue is full (backpressure), so call it from a worker thread if the event loop must never wait."""
        client, owned = sync_twin(self, transport=transport, max_retries=max_retries, timeout=timeout)
        return FeedbackStream(client, owns_client=owned, **options)
    # -- end R2M ----------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the connection pool (only when this client created it)."""
        if self._owns_http:
            await self._http.aclose()

    aclose = close

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ I/O
    async def _score_items(
        self, items: list[Item], *, model: str | None = None, split: bool = True
    ) -> Scores:
        """Score ready-made items; ``split=False`` sends them in one request (used by the adapters)."""

        async def one(chunk: list[Item]) -> Scores:
            body = self._score_body(chunk, model, dense=False, beta=0.0)
            return self._parse_scores(
                await self._request("POST", "/v1/rewards", body, len(chunk)), len(chunk)
            )

        parts = await self._map_bounded(one, self._chunks(items, None if split else max(1, len(items))))
        out = Scores()
        for part in parts:
            out.extend_from(part)
        return out

    async def _map_bounded(
        self, fn: Callable[[list[Item]], Awaitable[T]], chunks: list[list[Item]]
    ) -> list[T]:
        """Run ``fn`` on every chunk, ``max_concurrency`` at a time, results in chunk order.

        On the first failure the other requests are cancelled and that failure is raised as is.
        """
        if len(chunks) <= 1:
            return [await fn(c) for c in chunks]
        sem = asyncio.Semaphore(self.max_concurrency)

        async def bounded(chunk: list[Item]) -> T:
            async with sem:
                return await fn(chunk)

        tasks = [asyncio.ensure_future(bounded(c)) for c in chunks]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def _request(self, method: str, path: str, body: Any = None, weight: int = 1, *,
                       content: bytes | None = None, params: Mapping[str, str] | None = None,
                       headers: Mapping[str, str] | None = None, timeout: httpx.Timeout | None = None) -> Any:
        """Send with endpoint selection, failover and bounded retries; return the decoded JSON body."""
        state = _RetryState()
        kw = self._request_kwargs(body, content, params, headers, timeout)
        while True:
            ep = self._acquire(weight)
            url = ep.url + path
            try:
                response = await self._http.request(method, url, **kw)
            except httpx.TransportError as exc:
                err: Any = self._transport_error(ep, url, exc)
            else:
                self._mark_alive(ep)
                if response.is_success:
                    return self._read_json(response)
                err = self._api_error(response)
            finally:
                self._release(ep, weight)
            delay = self._retry_delay(state, err, ep)
            if delay is None:
                raise err
            await asyncio.sleep(delay)


def sync_twin(client: RewardClient | AsyncRewardClient, *, transport: httpx.BaseTransport | None = None,
              max_retries: int | None = None, timeout: float | None = None) -> tuple[RewardClient, bool]:
    """(a sync client for ``client``'s URLs, headers and retry policy, whether it is new). A `RewardClient` with
    nothing to change is returned as is; an `AsyncRewardClient` always gets a sync twin (R2M's feedback thread)."""
    if isinstance(client, RewardClient) and transport is None and max_retries is None and timeout is None:
        return client, False
    headers = {k: v for k, v in client._headers.items() if k not in ("User-Agent", "Accept")}
    twin = RewardClient(client.base_urls, headers=headers, transport=transport,
                        max_retries=client.max_retries if max_retries is None else max_retries,
                        max_retry_wait=client.max_retry_wait, backoff_base=client.backoff_base,
                        backoff_max=client.backoff_max, failover_cooldown=client.failover_cooldown,
                        timeout=client.timeout if timeout is None else httpx.Timeout(timeout, connect=10.0),
                        run_id=client.run_id, step=client.step)
    return twin, True
