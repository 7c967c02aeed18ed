"""Redis-backed shared state of a fleet of reward-server replicas (optional: without Redis the server runs alone).

`RedisState` is the one object that talks to Redis. It never lets Redis stop scoring: every operation has a short
timeout, a failure marks the connection *down*, and while it is down the cache is bypassed (lookups return
``None``, stores are dropped) without touching the network. A background task reconnects by itself with
exponential backoff, re-subscribes, and catches up on head versions published while it was away.

What lives in Redis (``ns`` is the key namespace, ``rewardkit`` by default):

=====================================  ====================================================================
key                                    value
=====================================  ====================================================================
``ns:cache:<model>:<head>:<sha256>``   a cached score (16-byte struct, see `CachedScore`), with a TTL
``ns:head:<model>:<version>``          published head weights (safetensors bytes), no TTL
``ns:head:<model>:latest``             JSON: version, sha256 of the weights, origin replica, time, meta
``ns:drift:<model>:<replica>``         a replica's drift window (`drift.encode_state` bytes), short TTL
``ns:drift:<model>:replicas``          set of replica ids that pushed a drift window
channel ``ns:events``                  JSON events: ``{"kind": "head", ...}``, ``{"kind": "drift", ...}``
=====================================  ====================================================================

Head publication API (stable; the R2M updater uses it)::

    state = RedisState("redis://127.0.0.1:6379/0", replica_id="a")
    await state.connect()
    # publisher (the replica whose updater trained a new head):
    receivers = await state.publish_head("my-rm", "r2m-000042", safetensors_bytes, meta={"loss": 0.41})
    # every replica (including late joiners and ones that were disconnected) gets a HeadUpdate:
    async def on_head(update: HeadUpdate) -> None:     # a plain function works too
        swap_in(update.model_id, update.version, update.weights)   # weights: safetensors bytes, sha256-checked
    state.subscribe(on_head)
    latest = await state.fetch_head("my-rm")            # HeadUpdate | None: what a fresh replica should load

- `publish_head` stores the weights and the ``latest`` record in one MULTI/EXEC transaction, then publishes a
  ``head`` event. It raises `StateUnavailable` when Redis is down (the caller keeps its head locally and may retry).
- Callbacks run on the event loop of `connect`; updates that this replica published itself are not delivered
  back to it (it already holds that head). After a reconnect (or at start-up) the ``latest`` record of every
  model seen so far is compared with what was last delivered, so an update published while this replica was
  disconnected still arrives, once.
- A callback that raises is logged and does not stop the others.
- In the server, the connected instance is ``app.state.rk.redis`` (absent without ``redis_url``). The app
  registers one callback, ``RewardService.swap_scalar_head``, which installs safetensors holding ``weight`` (and
  ``bias``) of the scalar head's shape and ignores anything else; an R2M head format needs its own
  ``subscribe(callback)`` that installs it (and should return early for versions it already serves).

Score cache: `cache_key` hashes the formatted text and its token ids (so a truncated form never aliases the
full one); `cache_get_many` / `cache_put_many` take model id and head version, so a new head never reads an old
head's scores.

Drift: `push_drift` stores this replica's `DriftMonitor.to_state()`; `fleet_drift_states` returns every live
replica's state for `drift.merge_states`. A `drift_provider` given to the constructor is pushed every
``drift_sync_interval_s`` by the background task.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import socket
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from rewardkit.server.drift import decode_state, encode_state

log = logging.getLogger(__name__)

__all__ = ["CachedScore", "HeadUpdate", "RedisState", "StateUnavailable", "cache_key"]

_CACHE_STRUCT = struct.Struct("<ddi?xxx")  # reward, raw_reward, num_tokens, truncated (+3 pad) = 24 bytes
_FAILURES = (RedisError, OSError, asyncio.TimeoutError)


class StateUnavailable(RuntimeError):
    """Redis is down (or not configured); the caller decides whether to degrade or refuse."""


@dataclasses.dataclass(frozen=True)
class CachedScore:
    """What the score cache holds for one formatted item."""

    reward: float
    raw_reward: float
    num_tokens: int
    truncated: bool

    def to_bytes(self) -> bytes:
        return _CACHE_STRUCT.pack(self.reward, self.raw_reward, self.num_tokens, self.truncated)

    @classmethod
    def from_bytes(cls, data: bytes) -> CachedScore:
        if len(data) != _CACHE_STRUCT.size:
            raise ValueError(f"cached score: expected {_CACHE_STRUCT.size} bytes, got {len(data)}")
        reward, raw, n, trunc = _CACHE_STRUCT.unpack(data)
        return cls(reward=reward, raw_reward=raw, num_tokens=n, truncated=trunc)


@dataclasses.dataclass(frozen=True)
class HeadUpdate:
    """A published head version. ``weights`` are safetensors bytes whose sha256 was checked on receipt."""

    model_id: str
    version: str
    weights: bytes
    sha256: str
    origin: str
    published_at: float
    meta: dict[str, Any]


HeadCallback = Callable[[HeadUpdate], Awaitable[None] | None]
EventCallback = Callable[[dict[str, Any]], Awaitable[None] | None]
DriftStates = tuple[str, dict[str, Any]] | list[tuple[str, dict[str, Any]]] | None  # what a drift_provider returns


def cache_key(text: str, input_ids: Sequence[int]) -> str:
    """sha256 (hex) of a formatted text and its token ids.

    >>> cache_key("hi", [1, 2]) == cache_key("hi", (1, 2))
    True
    """
    h = hashlib.sha256(text.encode("utf-8", "surrogatepass"))
    h.update(b"\x00")
    h.update(struct.pack(f"<{len(input_ids)}q", *input_ids))
    return h.hexdigest()


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class RedisState:
    """Connection to Redis with reconnect/backoff, score cache, head publication and drift sharing.

    Args:
        url: ``redis://host:port/db``.
        namespace: key prefix, so several fleets can share one Redis.
        replica_id: this replica's name (default: host-pid-random).
        cache_ttl_s: TTL of cached scores; 0 disables the cache.
        op_timeout_s: socket timeout of one operation; a slower Redis counts as down.
        backoff_min_s / backoff_max_s: reconnect delays (doubling from min to max).
        drift_provider: returns ``(model_id, DriftMonitor.to_state())``, a list of them (one per served model), or
            None; pushed periodically.
        drift_sync_interval_s: how often; replica windows expire after 3 intervals without a push.
    """

    def __init__(self, url: str, *, namespace: str = "rewardkit", replica_id: str | None = None,
                 cache_ttl_s: int = 3600, op_timeout_s: float = 0.5, backoff_min_s: float = 0.1,
                 backoff_max_s: float = 5.0, drift_provider: Callable[[], DriftStates] | None = None,
                 drift_sync_interval_s: float = 5.0) -> None:
        if op_timeout_s <= 0:
            raise ValueError(f"op_timeout_s must be > 0, got {op_timeout_s}")
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError(f"need 0 < backoff_min_s <= backoff_max_s, got {backoff_min_s}, {backoff_max_s}")
        if drift_sync_interval_s <= 0:
            raise ValueError(f"drift_sync_interval_s must be > 0, got {drift_sync_interval_s}")
        self.url = url
        self.ns = namespace
        self.replica_id = replica_id or default_replica_id()
        self.cache_ttl_s = cache_ttl_s
        self.op_timeout_s = op_timeout_s
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.drift_provider = drift_provider
        self.drift_sync_interval_s = drift_sync_interval_s
        self.available = False
        self.reconnects = 0  # successful (re)connections after the first
        self.failures = 0  # operations that failed and marked the connection down
        self._ever_connected = False
        self._client: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._head_callbacks: list[HeadCallback] = []
        self._event_callbacks: list[EventCallback] = []
        self._delivered: dict[str, str] = {}  # model_id -> last head version delivered to callbacks (or known)
        self._last_drift_push = 0.0

    # -- keys ----------------------------------------------------------------------------------------------
    @property
    def events_channel(self) -> str:
        return f"{self.ns}:events"

    def _cache_key(self, model_id: str, head_version: str, key: str) -> str:
        return f"{self.ns}:cache:{model_id}:{head_version}:{key}"

    def _head_key(self, model_id: str, version: str) -> str:
        return f"{self.ns}:head:{model_id}:{version}"

    # -- life cycle ----------------------------------------------------------------------------------------
    async def connect(self) -> bool:
        """Create the client, try once to reach Redis, and start the background task. Never raises on a down Redis.

        Returns whether Redis answered now; if not, the background task keeps trying.
        """
        if self._client is None:
            self._client = aioredis.Redis.from_url(
                self.url, socket_timeout=self.op_timeout_s, socket_connect_timeout=self.op_timeout_s,
                retry=Retry(NoBackoff(), 0), health_check_interval=0)
        try:
            await self._client.ping()
            self._mark_up()
        except _FAILURES as exc:
            self._mark_down("connect", exc)
            log.warning("redis not reachable at %s (%s: %s); serving without it, retrying in the background",
                        _safe_url(self.url), type(exc).__name__, exc)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="rewardkit-redis-state")
        return self.available

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._client is not None:
            with contextlib.suppress(*_FAILURES):
                await self._client.aclose()
            self._client = None
        self.available = False

    def _mark_up(self) -> None:
        if not self.available:
            if self._ever_connected:
                self.reconnects += 1
                log.info("redis reconnected url=%s replica=%s", _safe_url(self.url), self.replica_id)
            else:
                log.info("redis connected url=%s replica=%s", _safe_url(self.url), self.replica_id)
        self._ever_connected = True
        self.available = True

    def _mark_down(self, op: str, exc: BaseException) -> None:
        if self.available:
            self.failures += 1
            log.warning("redis down op=%s error=%s: %s; cache bypassed, reconnecting in the background",
                        op, type(exc).__name__, exc)
        self.available = False

    def _redis(self) -> aioredis.Redis:
        if self._client is None or not self.available:
            raise StateUnavailable("redis is not available")
        return self._client

    # -- background: subscribe, catch up, push drift, reconnect ----------------------------------------------
    async def _run(self) -> None:
        delay = self.backoff_min_s
        while not self._closed:
            try:
                await self._session()
                delay = self.backoff_min_s
            except asyncio.CancelledError:
                raise
            except (*_FAILURES, StateUnavailable) as exc:
                self._mark_down("subscribe", exc)
            except Exception:  # a bug in a callback path must not kill reconnection
                log.exception("redis state task error")
            if self._closed:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max_s)

    async def _session(self) -> None:
        """One connected period: ping, subscribe, catch up, then pump events until a failure."""
        assert self._client is not None
        if not self.available:  # after an outage the pool holds dead sockets: drop them all, not one per failure
            await self._client.connection_pool.disconnect()
        await self._client.ping()
        self._mark_up()
        pubsub = self._client.pubsub()
        try:
            await pubsub.subscribe(self.events_channel)
            await self._catch_up()
            while not self._closed:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None and msg.get("type") == "message":
                    await self._on_event(msg["data"])
                if not self.available:  # an operation elsewhere failed: restart the session
                    await self._client.ping()
                    self._mark_up()
                await self._maybe_push_drift()
        finally:
            with contextlib.suppress(*_FAILURES):
                await pubsub.aclose()

    async def _catch_up(self) -> None:
        for model_id in list(self._delivered):
            update = await self.fetch_head(model_id)
            if update is not None and update.version != self._delivered.get(model_id):
                await self._deliver(update)

    async def _on_event(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            kind = event["kind"]
        except (ValueError, KeyError, TypeError):
            log.warning("redis event ignored: not a JSON event with a kind")
            return
        if event.get("origin") == self.replica_id:
            return
        if kind == "head":
            update = await self.fetch_head(str(event["model_id"]), str(event["version"]))
            if update is None:
                log.warning("head event model=%s version=%s: weights missing in redis", event.get("model_id"),
                            event.get("version"))
                return
            await self._deliver(update)
        else:
            for cb in list(self._event_callbacks):
                await _call(cb, event)

    async def _deliver(self, update: HeadUpdate) -> None:
        self._delivered[update.model_id] = update.version
        log.info("head update model=%s version=%s origin=%s", update.model_id, update.version, update.origin)
        for cb in list(self._head_callbacks):
            await _call(cb, update)

    async def _maybe_push_drift(self) -> None:
        if self.drift_provider is None or time.monotonic() - self._last_drift_push < self.drift_sync_interval_s:
            return
        self._last_drift_push = time.monotonic()
        got = self.drift_provider()
        for model_id, st in [got] if isinstance(got, tuple) else got or []:
            await self.push_drift(model_id, st)

    # -- subscriptions ---------------------------------------------------------------------------------------
    def subscribe(self, callback: HeadCallback) -> None:
        """Call ``callback(HeadUpdate)`` for every head version another replica publishes (see module docstring)."""
        self._head_callbacks.append(callback)

    def subscribe_events(self, callback: EventCallback) -> None:
        """Call ``callback(event_dict)`` for every non-head event from another replica (e.g. drift pin/reset)."""
        self._event_callbacks.append(callback)

    def track_model(self, model_id: str, current_version: str) -> None:
        """Say which head version this replica serves, so catch-up delivers only newer ones."""
        self._delivered.setdefault(model_id, current_version)

    async def publish_event(self, kind: str, **fields: Any) -> int:
        """Publish ``{"kind": kind, "origin": replica_id, **fields}``; returns how many subscribers got it."""
        msg = json.dumps({"kind": kind, "origin": self.replica_id, **fields})
        return int(await self._op("publish", self._redis().publish(self.events_channel, msg)))

    # -- heads -----------------------------------------------------------------------------------------------
    async def publish_head(self, model_id: str, version: str, weights: bytes, meta: dict[str, Any] | None = None
                           ) -> int:
        """Store ``weights`` (safetensors bytes) as ``version`` of ``model_id``'s head and notify every replica.

        Returns how many subscribers received the event (this replica's own subscriber included).
        Raises `StateUnavailable` when Redis is down.
        """
        if not model_id or not version or ":" in version:
            raise ValueError(f"publish_head: model_id and version must be non-empty and version without ':', "
                             f"got {model_id!r}, {version!r}")
        if not isinstance(weights, bytes | bytearray) or not weights:
            raise ValueError("publish_head: weights must be non-empty safetensors bytes")
        record = {"version": version, "sha256": hashlib.sha256(weights).hexdigest(), "origin": self.replica_id,
                  "published_at": time.time(), "meta": meta or {}}
        r = self._redis()

        async def _tx() -> int:
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(self._head_key(model_id, version), bytes(weights))
                pipe.set(self._head_key(model_id, "latest"), json.dumps(record))
                await pipe.execute()
            return int(await r.publish(self.events_channel, json.dumps(
                {"kind": "head", "origin": self.replica_id, "model_id": model_id, "version": version})))

        receivers = await self._op("publish_head", _tx())
        self._delivered[model_id] = version
        return receivers

    async def fetch_head(self, model_id: str, version: str | None = None) -> HeadUpdate | None:
        """The latest published head of ``model_id`` (or a given ``version``); None if none was published."""
        r = self._redis()

        async def _get() -> HeadUpdate | None:
            raw = await r.get(self._head_key(model_id, "latest"))
            if raw is None:
                return None
            record = json.loads(raw)
            if version is not None and record["version"] != version:
                # an older version was asked for (the event raced a newer publish): the latest wins
                log.info("head %s superseded by %s", version, record["version"])
            raw_weights = await r.get(self._head_key(model_id, record["version"]))
            if raw_weights is None:
                return None
            weights = _as_bytes(raw_weights)
            digest = hashlib.sha256(weights).hexdigest()
            if digest != record["sha256"]:
                log.error("head model=%s version=%s: sha256 mismatch, ignored", model_id, record["version"])
                return None
            return HeadUpdate(model_id=model_id, version=record["version"], weights=weights, sha256=digest,
                              origin=record["origin"], published_at=float(record["published_at"]),
                              meta=dict(record.get("meta") or {}))

        return await self._op("fetch_head", _get())

    # -- score cache -----------------------------------------------------------------------------------------
    async def cache_get_many(self, model_id: str, head_version: str, keys: Sequence[str]
                             ) -> list[CachedScore | None] | None:
        """Cached scores for ``keys`` (None per miss); None as a whole when the cache is bypassed (Redis down)."""
        if not keys or self.cache_ttl_s == 0 or not self.available:
            return None
        try:
            raws = await self._op("cache_get", self._redis().mget(
                [self._cache_key(model_id, head_version, k) for k in keys]))
        except StateUnavailable:
            return None
        out: list[CachedScore | None] = []
        for raw in raws:
            try:
                out.append(None if raw is None else CachedScore.from_bytes(raw))
            except ValueError:
                out.append(None)
        return out

    async def cache_put_many(self, model_id: str, head_version: str, entries: Sequence[tuple[str, CachedScore]]
                             ) -> bool:
        """Store scores with the TTL; returns False (and drops them) when Redis is down."""
        if not entries or self.cache_ttl_s == 0 or not self.available:
            return False
        try:
            r = self._redis()

            async def _put() -> None:
                async with r.pipeline(transaction=False) as pipe:
                    for k, v in entries:
                        pipe.set(self._cache_key(model_id, head_version, k), v.to_bytes(), ex=self.cache_ttl_s)
                    await pipe.execute()

            await self._op("cache_put", _put())
            return True
        except StateUnavailable:
            return False

    # -- drift -----------------------------------------------------------------------------------------------
    async def push_drift(self, model_id: str, state: dict[str, Any]) -> None:
        """Store this replica's drift state (expires after 3 sync intervals without a push)."""
        r = self._redis()
        ttl = max(1, int(3 * self.drift_sync_interval_s + 0.999))

        async def _push() -> None:
            async with r.pipeline(transaction=True) as pipe:
                pipe.set(f"{self.ns}:drift:{model_id}:{self.replica_id}", encode_state(state), ex=ttl)
                pipe.sadd(f"{self.ns}:drift:{model_id}:replicas", self.replica_id)
                await pipe.execute()

        await self._op("push_drift", _push())

    async def fleet_drift_states(self, model_id: str) -> dict[str, dict[str, Any]]:
        """Every live replica's drift state of ``model_id`` (replica id -> state); expired replicas are pruned."""
        r = self._redis()

        async def _get() -> dict[str, dict[str, Any]]:
            index = f"{self.ns}:drift:{model_id}:replicas"
            ids = sorted(x.decode() if isinstance(x, bytes) else str(x) for x in await r.smembers(index))
            if not ids:
                return {}
            raws = await r.mget([f"{self.ns}:drift:{model_id}:{i}" for i in ids])
            out: dict[str, dict[str, Any]] = {}
            gone = []
            for rid, raw in zip(ids, raws, strict=True):
                if raw is None:
                    gone.append(rid)
                    continue
                try:
                    out[rid] = decode_state(_as_bytes(raw))
                except ValueError as exc:
                    log.warning("drift state of replica %s ignored: %s", rid, exc)
            if gone:
                await r.srem(index, *gone)
            return out

        return await self._op("fleet_drift", _get())

    # -- plumbing --------------------------------------------------------------------------------------------
    async def _op(self, name: str, coro: Awaitable[Any]) -> Any:
        try:
            return await asyncio.wait_for(coro, timeout=self.op_timeout_s * 4)
        except _FAILURES as exc:
            self._mark_down(name, exc)
            raise StateUnavailable(f"redis {name} failed: {type(exc).__name__}: {exc}") from exc


async def _call(cb: Callable[[Any], Awaitable[None] | None], arg: Any) -> None:
    try:
        res = cb(arg)
        if inspect.isawaitable(res):
            await res
    except Exception:
        log.exception("redis state callback %s failed", getattr(cb, "__name__", cb))


def _as_bytes(value: bytes | str) -> bytes:
    """redis-py returns bytes (no decode_responses); the typing says bytes | str."""
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogateescape")


def _safe_url(url: str) -> str:
    """The URL without a password."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
