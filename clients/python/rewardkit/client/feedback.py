"""R2M from the trainer's side: stream policy hidden states to ``/v1/r2m/feedback``, get R2M rewards.

numpy + httpx only; torch is imported lazily, and only by `HiddenStateCapture` and when a torch tensor is given.

Example (GRPO: K rollouts per prompt, one group id per prompt and round)::

    from rewardkit.client.feedback import FeedbackStream, HiddenStateCapture, r2m_rewards

    with HiddenStateCapture(policy) as cap:            # forward hook on the policy's last layer
        out = policy(input_ids, attention_mask=mask)    # (B, T) -> cap.pop(): (B, T, D_p)
    hidden = cap.pop()
    rewards = r2m_rewards("http://localhost:8000", group_ids, indices, round=t, hidden=per_row,
                          items=[{"prompt": p, "response": r} for p, r in zip(prompts, completions)])
    with FeedbackStream("http://localhost:8000", dtype="bfloat16") as fs:
        for g, i, h, item in zip(group_ids, indices, per_row, items):
            fs.add(g, i, t, h, item)                    # blocks when the send queue is full (backpressure)
        fs.flush()                                      # everything sent; groups applied by the server
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from rewardkit.client.errors import APIError, RewardKitError, parse_error

# rewardkit.core.wire is numpy-only; it is imported when first used so that ``import rewardkit.client`` stays
# free of rewardkit.core (tests/unit/client/test_exports.py).
MAGIC = b"RKF1"


def _wire() -> Any:
    from rewardkit.core import wire

    return wire

log = logging.getLogger(__name__)

__all__ = ["FeedbackStream", "HiddenStateCapture", "r2m_rewards", "to_numpy"]

_STOP = object()


def to_numpy(hidden: Any) -> np.ndarray:
    """A torch tensor (any dtype/device, incl. bfloat16) or array-like -> numpy (S, D) without copying numpy input."""
    if hasattr(hidden, "detach") and hasattr(hidden, "cpu"):  # torch.Tensor, without importing torch
        hidden = hidden.detach().float().cpu().numpy()
    a = np.asarray(hidden)
    if a.ndim != 2:
        raise ValueError(f"hidden must be (S, D) for one rollout, got shape {a.shape}")
    return a


def _base_and_headers(client_or_url: Any, api_key: str | None) -> tuple[str, dict[str, str]]:
    if isinstance(client_or_url, str):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return client_or_url.rstrip("/"), headers
    urls = getattr(client_or_url, "base_urls", None)
    if not urls:
        raise TypeError("client_or_url must be a URL or a RewardClient")
    headers = dict(getattr(client_or_url, "_headers", {}))
    headers.pop("Accept", None)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return str(urls[0]).rstrip("/"), headers


def _header(group_id: str, index: int, round: int, item: Mapping[str, Any] | None, rm_item_key: str | None,
            group_size: int | None) -> dict[str, Any]:
    h: dict[str, Any] = {"group_id": str(group_id), "index": int(index), "round": int(round)}
    if item is not None:
        h["item"] = dict(item)
    if rm_item_key is not None:
        h["rm_item_key"] = rm_item_key
    if item is None and rm_item_key is None:
        raise ValueError("give item= (prompt+response, messages or text) or rm_item_key=")
    if group_size is not None:
        h["group_size"] = int(group_size)
    return h


class FeedbackStream:
    """Batches feedback frames and streams them to ``POST /v1/r2m/feedback`` from a background thread.

    Args:
        client_or_url: a `RewardClient` (its first URL and its API key are used) or a base URL.
        dtype: wire dtype, "bfloat16" (default: half the bytes of float32), "float16" or "float32".
        max_positions: strided mean pooling to at most this many positions before sending (None: all).
        batch_frames: frames per HTTP request (one streamed body).
        max_queue: frames waiting to be sent; ``add`` blocks when it is full (backpressure).
        max_retries: retries of a batch on transport errors, 429 and 503 (the server deduplicates re-sent frames).
    """

    def __init__(self, client_or_url: Any, *, api_key: str | None = None, dtype: str = "bfloat16",
                 max_positions: int | None = None, batch_frames: int = 64, max_queue: int = 256,
                 max_retries: int = 5, timeout: float = 120.0, linger_s: float = 0.05,
                 transport: httpx.BaseTransport | None = None) -> None:
        if batch_frames < 1 or max_queue < 1:
            raise ValueError("batch_frames and max_queue must be >= 1")
        self.url, self._headers = _base_and_headers(client_or_url, api_key)
        self._headers["Content-Type"] = "application/octet-stream"
        self.dtype = dtype
        self.max_positions = max_positions
        self.batch_frames = batch_frames
        self.max_retries = max_retries
        self.linger_s = linger_s
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10.0), transport=transport)
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
        frame = _wire().encode_frame(_header(group_id, index, round, item, rm_item_key, group_size), a, self.dtype)
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
        self._http.close()
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
        def body() -> Iterator[bytes]:
            yield MAGIC
            yield from frames

        size = len(MAGIC) + sum(len(f) for f in frames)
        for attempt in range(self.max_retries + 1):
            try:
                r = self._http.post(f"{self.url}/v1/r2m/feedback", params={"flush": "true"} if flush else None,
                                    content=body(), headers=self._headers)
            except httpx.TransportError as exc:
                if attempt == self.max_retries:
                    self._error = RewardKitError(f"feedback not delivered after {attempt + 1} attempts: {exc}")
                    return
                time.sleep(min(0.2 * 2 ** attempt, 5.0))
                continue
            self.requests += 1
            if r.status_code in (429, 503) and attempt < self.max_retries:
                time.sleep(float(r.headers.get("Retry-After", 1)))
                continue
            if r.status_code != 200:
                err: APIError = parse_error(r.status_code, r.content, headers=r.headers)
                log.warning("feedback batch refused: %s", err)
                self._error = err
                return
            self.last_response = r.json()
            self.frames_sent += len(frames)
            self.bytes_sent += size
            return


def r2m_rewards(client_or_url: Any, group_ids: Sequence[str], indices: Sequence[int], round: int,
                hidden: Sequence[Any], items: Sequence[Mapping[str, Any]], *, api_key: str | None = None,
                dtype: str = "bfloat16", max_positions: int | None = None, timeout: float = 120.0
                ) -> dict[str, Any]:
    """``POST /v1/r2m/rewards``: R2M rewards for items with their policy hidden states.

    Returns the parsed response: ``{"model", "head_version", "rewards": [...], "results": [...]}``; each result
    carries ``item_key``, which ``FeedbackStream.add(..., rm_item_key=...)`` accepts instead of the item.
    """
    n = len(items)
    if not (len(group_ids) == len(indices) == len(hidden) == n):
        raise ValueError(f"group_ids, indices, hidden and items must have the same length ({n})")
    url, headers = _base_and_headers(client_or_url, api_key)
    headers["Content-Type"] = "application/octet-stream"

    def body() -> Iterator[bytes]:
        yield MAGIC
        for i in range(n):
            a = to_numpy(hidden[i])
            if max_positions is not None:
                a = _wire().reduce_positions(a, max_positions)
            yield _wire().encode_frame(_header(group_ids[i], indices[i], round, items[i], None, None), a, dtype,
                               frame_index=i)

    r = httpx.post(f"{url}/v1/r2m/rewards", content=body(), headers=headers, timeout=timeout)
    if r.status_code != 200:
        raise parse_error(r.status_code, r.content, headers=r.headers)
    return r.json()  # type: ignore[no-any-return]


class HiddenStateCapture:
    """Forward hook that keeps a policy's last-layer hidden states (what HF returns as ``last_hidden_state``).

    Hooks the final norm of a decoder (``model.model.norm``, ``transformer.ln_f``, ...) or a module you name.
    During ``generate`` each step adds its new positions; ``pop()`` returns them concatenated, (B, T, D), as
    float32 on the CPU, and resets. Use it in the training forward pass of the policy's last epoch to get the
    states at no extra forward cost.
    """

    _CANDIDATES = ("model.norm", "model.model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
                   "model.final_layernorm", "base_model.model.model.norm")

    def __init__(self, model: Any, module: Any = None) -> None:
        self.model = model
        self.module = module if module is not None else self._find(model)
        self._chunks: list[Any] = []
        self._handle: Any = None

    @classmethod
    def _find(cls, model: Any) -> Any:
        for path in cls._CANDIDATES:
            obj = model
            for part in path.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    break
            if obj is not None:
                return obj
        raise ValueError("cannot find the final norm of this model; pass module=<the last layer's output module>")

    def _hook(self, _module: Any, _inputs: Any, output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self._chunks.append(out.detach())

    def __enter__(self) -> HiddenStateCapture:
        self._handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def pop(self) -> Any:
        """(B, T, D) float32 CPU tensor of every position seen since the last pop."""
        import torch

        if not self._chunks:
            raise RuntimeError("no forward pass was captured")
        out = torch.cat([c.float().cpu() for c in self._chunks], dim=1)
        self._chunks = []
        return out

    @staticmethod
    def rows(hidden: Any, attention_mask: Any) -> list[np.ndarray]:
        """Split (B, T, D) into per-rollout (S_i, D) arrays keeping attended positions only."""
        h = to_numpy_3d(hidden)
        m = np.asarray(attention_mask.cpu() if hasattr(attention_mask, "cpu") else attention_mask).astype(bool)
        return [h[b][m[b]] for b in range(h.shape[0])]


def to_numpy_3d(hidden: Any) -> np.ndarray:
    if hasattr(hidden, "detach"):
        hidden = hidden.detach().float().cpu().numpy()
    return np.asarray(hidden)
