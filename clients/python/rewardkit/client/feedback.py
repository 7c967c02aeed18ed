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
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import numpy as np

from rewardkit.client._client import AsyncRewardClient, RewardClient, sync_twin
from rewardkit.client.frames import MAGIC, encode_rewards_body, to_numpy
from rewardkit.client.stream import FeedbackStream as _Stream

log = logging.getLogger(__name__)

__all__ = ["MAGIC", "FeedbackStream", "HiddenStateCapture", "encode_rewards_body", "r2m_rewards", "to_numpy"]


def _sync_client(client_or_url: Any, api_key: str | None, max_retries: int | None, timeout: float | None,
                 transport: httpx.BaseTransport | None) -> tuple[RewardClient, bool]:
    """(a sync RewardClient, whether we own it) for a URL, or for a client (`sync_twin`)."""
    if isinstance(client_or_url, str):
        opts: dict[str, Any] = {} if max_retries is None else {"max_retries": max_retries}
        if timeout is not None:
            opts["timeout"] = httpx.Timeout(timeout, connect=10.0)
        return RewardClient(client_or_url, api_key=api_key, transport=transport, **opts), True
    if isinstance(client_or_url, RewardClient | AsyncRewardClient):
        return sync_twin(client_or_url, transport=transport, max_retries=max_retries, timeout=timeout)
    raise TypeError("client_or_url must be a URL, a RewardClient or an AsyncRewardClient")


class FeedbackStream(_Stream):
    """:class:`rewardkit.client.stream.FeedbackStream` to a URL, a `RewardClient` or an `AsyncRewardClient`.

    Args:
        client_or_url: a base URL, or a client (its URLs, API key and retry policy are used).
        api_key: for a URL; with a client, sent instead of its key.
        dtype: wire dtype, "bfloat16" (default: half the bytes of float32), "float16" or "float32".
        max_positions: strided mean pooling to at most this many positions before sending (None: all).
        batch_frames: frames per HTTP request.
        max_queue: frames waiting to be sent; ``add`` blocks when it is full (backpressure).
        max_retries: retries of a batch on transport errors, 429 and 503 (the server deduplicates re-sent frames),
            with the client's failover and its ``max_retry_wait`` bound on ``Retry-After`` (default 5 for a URL; a
            client's own policy otherwise).
        timeout: per request, seconds (default 120 for a URL).
        transport: an httpx transport for the stream's own client (tests).
    """

    def __init__(self, client_or_url: Any, *, api_key: str | None = None, dtype: str = "bfloat16",
                 max_positions: int | None = None, batch_frames: int = 64, max_queue: int = 256,
                 max_retries: int | None = None, timeout: float | None = None, linger_s: float = 0.05,
                 transport: httpx.BaseTransport | None = None) -> None:
        if isinstance(client_or_url, str):  # the defaults of a stream of its own
            max_retries = 5 if max_retries is None else max_retries
            timeout = 120.0 if timeout is None else timeout
        client, owned = _sync_client(client_or_url, api_key, max_retries, timeout, transport)
        extra = {"Authorization": f"Bearer {api_key}"} if api_key and not owned else None
        super().__init__(client, owns_client=owned, extra_headers=extra, dtype=dtype, max_positions=max_positions,
                         batch_frames=batch_frames, max_queue=max_queue, linger_s=linger_s)


def r2m_rewards(client_or_url: Any, group_ids: Sequence[str], indices: Sequence[int], round: int,
                hidden: Sequence[Any], items: Sequence[Mapping[str, Any]], *, api_key: str | None = None,
                dtype: str = "bfloat16", max_positions: int | None = None, timeout: float | None = 120.0
                ) -> dict[str, Any]:
    """``POST /v1/r2m/rewards``: R2M rewards for items with their policy hidden states.

    Returns the parsed response: ``{"model", "head_version", "rewards": [...], "results": [...]}``; each result
    carries ``item_key``, which ``FeedbackStream.add(..., rm_item_key=...)`` accepts instead of the item.
    """
    client, owned = _sync_client(client_or_url, api_key, None, timeout, None)
    try:
        extra = {"Authorization": f"Bearer {api_key}"} if api_key and not owned else None
        return client._request("POST", "/v1/r2m/rewards",  # type: ignore[no-any-return]
                               content=encode_rewards_body(group_ids, indices, round, hidden, items, dtype,
                                                           max_positions),
                               headers=extra, weight=max(1, len(items)),
                               timeout=None if owned or timeout is None else httpx.Timeout(timeout, connect=10.0))
    finally:
        if owned:
            client.close()


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
