"""Feedback samples and the queue between ingestion (HTTP) and the updater (its own thread).

Two queues with one interface:

- `MemoryFeedbackQueue`: in-process, bounded; what is queued is lost on restart (documented).
- `RedisFeedbackQueue`: a Redis Stream with a consumer group. Ingestion XADDs (async client on the event loop);
  the updater XREADGROUPs (sync client on its thread), first its own pending entries (delivered before a
  crash, never acknowledged), then new ones. Entries are XACKed (and XDELed) only after the update that used
  them is durable, so a restart re-delivers exactly what was not applied.

A sample carries the RM's hidden state at the reward token (``h_last``, computed at ingestion by the model
worker) and the policy's hidden states, so the updater needs nothing from the model worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

log = logging.getLogger(__name__)

STREAM_GROUP = "r2m-updater"
CONSUMER = "updater"


@dataclass
class FeedbackSample:
    """One rollout's feedback: group (prompt) id, index in the group, round t, both hidden states, and the RM's fixed
    LL term (``ll_weight`` x the response's mean log-likelihood, 0 for a model without one): GREBT trains on
    ``head(h) + ll_term``, the reward that is served."""

    group_id: str
    index: int
    round: int
    group_size: int
    h_last: np.ndarray  # (D_rm,) float32
    hidden: np.ndarray  # (S, D_p) float16 or float32
    ll_term: float = 0.0

    @property
    def key(self) -> str:
        """Group key: a group is one prompt's rollouts in one round."""
        return f"{self.round}:{self.group_id}"

    def to_fields(self) -> dict[str, bytes]:
        meta = {"group_id": self.group_id, "index": self.index, "round": self.round, "group_size": self.group_size,
                "dtype": str(self.hidden.dtype), "shape": list(self.hidden.shape), "d_rm": int(self.h_last.shape[0]),
                "ll_term": float(self.ll_term)}
        return {"kind": b"sample", "meta": json.dumps(meta).encode(),
                "h_last": np.ascontiguousarray(self.h_last, dtype="<f4").tobytes(),
                "hidden": np.ascontiguousarray(self.hidden, dtype=self.hidden.dtype.newbyteorder("<")).tobytes()}

    @classmethod
    def from_fields(cls, f: dict[bytes, bytes]) -> FeedbackSample:
        meta = json.loads(f[b"meta"])
        dt = np.dtype(meta["dtype"]).newbyteorder("<")
        hidden = np.frombuffer(f[b"hidden"], dtype=dt).reshape(meta["shape"])
        h_last = np.frombuffer(f[b"h_last"], dtype="<f4").reshape(meta["d_rm"])
        return cls(group_id=meta["group_id"], index=int(meta["index"]), round=int(meta["round"]),
                   group_size=int(meta["group_size"]), h_last=h_last, hidden=hidden,
                   ll_term=float(meta.get("ll_term", 0.0)))  # records queued before the field: 0

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes + self.h_last.nbytes)


@dataclass
class Entry:
    """What the updater reads: a sample, or a flush marker (complete these group keys now)."""

    id: str
    sample: FeedbackSample | None = None
    flush_keys: list[str] = field(default_factory=list)
    flush_id: str | None = None


class FeedbackQueue(Protocol):
    """Where accepted feedback waits for the updater: the server's ingest side puts, the updater gets and acks.
    An entry is acknowledged only after the update that applied it is on disk (at-least-once; the store's applied
    keys make a re-delivery a no-op). Implementations: `MemoryFeedbackQueue` (one process), `RedisFeedbackQueue`
    (a Redis stream and consumer group, shared by replicas)."""

    kind: str

    async def put(self, samples: Sequence[FeedbackSample]) -> None: ...

    async def put_flush(self, keys: Sequence[str], flush_id: str) -> None: ...

    def get(self, timeout: float) -> list[Entry]: ...

    def ack(self, ids: Sequence[str]) -> None: ...

    def depth(self) -> int: ...

    async def aclose(self) -> None: ...

    def close(self) -> None: ...


class MemoryFeedbackQueue:
    """In-process bounded queue. ``put`` waits (asynchronously) while it is full: backpressure on the sender."""

    kind = "memory"

    def __init__(self, max_items: int = 65536) -> None:
        self._q: queue.Queue[Entry] = queue.Queue(maxsize=max_items)
        self._seq = 0
        self._lock = threading.Lock()

    def _next_id(self) -> str:
        with self._lock:
            self._seq += 1
            return str(self._seq)

    async def _put(self, entry: Entry) -> None:
        while True:
            try:
                self._q.put_nowait(entry)
                return
            except queue.Full:
                await asyncio.sleep(0.005)

    async def put(self, samples: Sequence[FeedbackSample]) -> None:
        for s in samples:
            await self._put(Entry(self._next_id(), sample=s))

    async def put_flush(self, keys: Sequence[str], flush_id: str) -> None:
        await self._put(Entry(self._next_id(), flush_keys=list(keys), flush_id=flush_id))

    def get(self, timeout: float) -> list[Entry]:
        """Updater side: up to 256 entries, waiting at most ``timeout`` for the first."""
        try:
            out = [self._q.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(out) < 256:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                break
        return out

    def ack(self, ids: Sequence[str]) -> None:
        """Nothing to acknowledge in memory."""

    def depth(self) -> int:
        return self._q.qsize()

    async def aclose(self) -> None:
        return None

    def close(self) -> None:
        return None


class RedisFeedbackQueue:
    """Redis Stream ``<ns>:r2m:<model>:feedback`` with consumer group ``r2m-updater``."""

    kind = "redis"

    def __init__(self, url: str, namespace: str, model_slug: str, *, op_timeout_s: float = 5.0,
                 max_len: int = 1_000_000) -> None:
        import redis
        import redis.asyncio as aioredis

        self.stream = f"{namespace}:r2m:{model_slug}:feedback"
        self.max_len = max_len
        self._aio = aioredis.Redis.from_url(url, socket_timeout=op_timeout_s, socket_connect_timeout=op_timeout_s)
        self._sync = redis.Redis.from_url(url, socket_timeout=op_timeout_s + 2.0, socket_connect_timeout=op_timeout_s)
        self._pending_done = False
        self._pending_cursor = "0"  # pages through this consumer's pending list (entries stay pending until acked)
        self._group_ready = False

    # -- ingestion side (event loop) ------------------------------------------------------------------------
    async def put(self, samples: Sequence[FeedbackSample]) -> None:
        if not samples:
            return
        # MULTI/EXEC: one request's frames land in the stream together, so the updater never reads half of them
        # (half a group held in memory when Redis then loses its data is a group that never completes).
        pipe = self._aio.pipeline(transaction=True)
        for s in samples:
            pipe.xadd(self.stream, s.to_fields())  # type: ignore[arg-type]
        await pipe.execute()

    async def put_flush(self, keys: Sequence[str], flush_id: str) -> None:
        await self._aio.xadd(self.stream, {"kind": b"flush", "keys": json.dumps(list(keys)).encode(),
                                           "flush_id": flush_id.encode()})

    # -- updater side (its thread) --------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        if self._group_ready:
            return
        import redis

        try:
            self._sync.xgroup_create(self.stream, STREAM_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def get(self, timeout: float) -> list[Entry]:
        """First the entries delivered to this consumer before a restart and never acknowledged, then new ones.

        Redis that comes back empty (no persistence, a failover, FLUSHALL) has lost the consumer group: the read
        answers NOGROUP. The group is then recreated and reading goes on, instead of looping on NOGROUP while
        feedback keeps being accepted and is never trained."""
        import redis

        try:
            return self._get(timeout)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("r2m redis lost the consumer group of %s (restarted empty?); recreating it", self.stream)
            self._group_ready, self._pending_done, self._pending_cursor = False, False, "0"
            return self._get(timeout)

    def _get(self, timeout: float) -> list[Entry]:
        self._ensure_group()
        if not self._pending_done:
            resp = self._sync.xreadgroup(STREAM_GROUP, CONSUMER, {self.stream: self._pending_cursor}, count=256)
            entries = self._decode(resp)
            if entries:
                self._pending_cursor = entries[-1].id
                return entries
            self._pending_done = True
        resp = self._sync.xreadgroup(STREAM_GROUP, CONSUMER, {self.stream: ">"}, count=256,
                                     block=max(1, int(timeout * 1000)))
        return self._decode(resp)

    def _decode(self, resp: Any) -> list[Entry]:
        out: list[Entry] = []
        for _stream, items in resp or []:
            for eid, fields in items:
                eid_s = eid.decode() if isinstance(eid, bytes) else str(eid)
                if not fields:  # deleted while pending
                    out.append(Entry(eid_s))
                    continue
                if fields.get(b"kind") == b"flush":
                    out.append(Entry(eid_s, flush_keys=json.loads(fields[b"keys"]),
                                     flush_id=fields.get(b"flush_id", b"").decode() or None))
                else:
                    out.append(Entry(eid_s, sample=FeedbackSample.from_fields(fields)))
        return out

    def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        pipe = self._sync.pipeline(transaction=True)
        pipe.xack(self.stream, STREAM_GROUP, *ids)
        pipe.xdel(self.stream, *ids)
        pipe.execute()

    def depth(self) -> int:
        try:
            return int(self._sync.xlen(self.stream))
        except Exception:  # noqa: BLE001 - a status read must not fail the caller
            return -1

    async def aclose(self) -> None:
        await self._aio.aclose()

    def close(self) -> None:
        self._sync.close()


