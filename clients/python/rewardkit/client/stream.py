"""`FeedbackStream`: batches R2M feedback frames and sends them to ``POST /v1/r2m/feedback`` from a background thread,
through a sync :class:`rewardkit.client.RewardClient`'s request path (failover, bounded ``Retry-After``, typed
errors). Build one with ``RewardClient.stream_feedback()`` or ``rewardkit.client.feedback.FeedbackStream(url)``."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rewardkit.client.errors import RewardKitError
from rewardkit.client.frames import MAGIC, _wire, frame_header, to_numpy

log = logging.getLogger(__name__)

__all__ = ["FeedbackStream"]

_STOP = object()


class FeedbackStream:
    """Batches feedback frames and streams them to ``POST /v1/r2m/feedback`` from a background thread.

    Args:
        client_or_url: a `RewardClient` (its first URL and its API key are used) or a base URL.
        dtype: wire dtype, "bfloat16" (default: half the bytes of float32), "float16" or "float32".
        max_positions: strided mean pooling to at most this many positions before sending (None: all).
        batch_frames: frames per HTTP request (one streamed body).
        max_queue: frames waiting to be sent; ``add`` blocks when it is full (backpressure).
        max_retries: retries of a batch on transport errors, 429 and 503 (the server deduplicates re-sent frames),
            with the client's failover and its ``max_retry_wait`` bound on ``Retry-After``; for a URL (with a
            client, its own policy applies unless this is given).
    """

    def __init__(self, client: Any, *, owns_client: bool = False, extra_headers: Mapping[str, str] | None = None,
                 dtype: str = "bfloat16",
                 max_positions: int | None = None, batch_frames: int = 64, max_queue: int = 256,
                 linger_s: float = 0.05) -> None:
        if batch_frames < 1 or max_queue < 1:
            raise ValueError("batch_frames and max_queue must be >= 1")
        self._client, self._owns_client = client, owns_client
        self._extra_headers = dict(extra_headers or {})
        self.url = self._client.base_urls[0]
        self.dtype = dtype
        self.max_positions = max_positions
        self.batch_frames = batch_frames
        self.linger_s = linger_s
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max_queue)
        self._error: RewardKitError | None = None
        self._closed = False
        self.frames_sent = 0
        self.bytes_sent = 0
        self.requests = 0
        self.last_response: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="rewardkit-feedback", daemon=True)
        self._thread.start()

    # -- producer side -------------------------------------------------------------------------------------
    def add(self, group_id: str, index: int, round: int, hidden: Any, item: Mapping[str, Any] | None = None, *,
            rm_item_key: str | None = None, group_size: int | None = None, timeout: float | None = None) -> None:
        """Queue one rollout's hidden states (S, D_p). Blocks while the queue is full; raises a send error seen."""
        self._raise_if_failed()
        if self._closed:
            raise RuntimeError("FeedbackStream is closed")
        a = to_numpy(hidden)
        if self.max_positions is not None:
            a = _wire().reduce_positions(a, self.max_positions)
        # encode now: the caller learns about NaN/Inf or a bad header at add(), naming the rollout
        frame = _wire().encode_frame(frame_header(group_id, index, round, item, rm_item_key, group_size), a, self.dtype)
        self._q.put(frame, timeout=timeout)

    def flush(self, complete_groups: bool = True, timeout: float | None = None) -> None:
        """Wait until every queued frame is sent; with ``complete_groups`` ask the server to apply every pending
        group now (groups of fewer than K members included; one-member groups are refused)."""
        done = threading.Event()
        self._q.put(("flush", complete_groups, done), timeout=timeout)
        if not done.wait(timeout):
            raise TimeoutError("FeedbackStream.flush timed out")
        self._raise_if_failed()

    def close(self) -> None:
        """Send what is queued and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()
        if self._owns_client:
            self._client.close()
        self._raise_if_failed()

    def __enter__(self) -> FeedbackStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    # -- sender thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[bytes] = []
            control: Any = None
            item = self._q.get()
            deadline = time.monotonic() + self.linger_s
            while True:
                if item is _STOP:
                    stop = True
                    break
                if isinstance(item, tuple):
                    control = item
                    break
                batch.append(item)
                if len(batch) >= self.batch_frames:
                    break
                try:
                    item = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
            if batch:
                self._send(batch, flush=False)
            if control is not None:
                _, complete, done = control
                if complete:
                    self._send([], flush=True)
                done.set()

    def _send(self, frames: Sequence[bytes], flush: bool) -> None:
        """One batch through the client's request path: failover, bounded retries on 429/503/transport errors."""
        body = MAGIC + b"".join(frames)
        try:
            self.last_response = self._client._request(
                "POST", "/v1/r2m/feedback", content=body, params={"flush": "true"} if flush else None,
                headers=self._extra_headers, weight=max(1, len(frames)))
        except RewardKitError as err:
            log.warning("feedback batch not delivered: %s", err)
            self._error = err
            return
        self.requests += 1
        self.frames_sent += len(frames)
        self.bytes_sent += len(body)
