"""The RKF1 frames a trainer sends for R2M (numpy only; ``rewardkit.core.wire`` is imported on first use so that
``import rewardkit.client`` stays free of rewardkit.core): array conversion, frame headers, the rewards body."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAGIC = b"RKF1"

__all__ = ["MAGIC", "encode_rewards_body", "frame_header", "to_numpy"]


def _wire() -> Any:
    from rewardkit.core import wire

    return wire


def to_numpy(hidden: Any) -> np.ndarray:
    """A torch tensor (any dtype/device, incl. bfloat16) or array-like -> numpy (S, D) without copying numpy input."""
    if hasattr(hidden, "detach") and hasattr(hidden, "cpu"):  # torch.Tensor, without importing torch
        hidden = hidden.detach().float().cpu().numpy()
    a = np.asarray(hidden)
    if a.ndim != 2:
        raise ValueError(f"hidden must be (S, D) for one rollout, got shape {a.shape}")
    return a


def frame_header(group_id: str, index: int, round: int, item: Mapping[str, Any] | None, rm_item_key: str | None,
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


def encode_rewards_body(group_ids: Sequence[str], indices: Sequence[int], round: int, hidden: Sequence[Any],
                        items: Sequence[Mapping[str, Any]], dtype: str = "bfloat16",
                        max_positions: int | None = None) -> bytes:
    """The RKF1 body of ``POST /v1/r2m/rewards``: one frame per item with its policy hidden states (S, D_p)."""
    n = len(items)
    if not (len(group_ids) == len(indices) == len(hidden) == n):
        raise ValueError(f"group_ids, indices, hidden and items must have the same length ({n})")
    parts = [MAGIC]
    for i in range(n):
        a = to_numpy(hidden[i])
        if max_positions is not None:
            a = _wire().reduce_positions(a, max_positions)
        parts.append(_wire().encode_frame(frame_header(group_ids[i], indices[i], round, items[i], None, None), a, dtype,
                                          frame_index=i))
    return b"".join(parts)
