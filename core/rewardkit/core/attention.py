"""The attention hook ABC needs, at the bottom of the core: an SDPA attention function that also captures one row.

``abc_sdpa`` calls transformers' ``sdpa_attention_forward`` for the real output and, only while a :func:`capture` is
active on this thread (a ``ContextVar``) and only for the selected layers, computes the ONE attention row needed per
batch item: ``softmax(q[b, :, t_b] @ k[b]^T * scaling + mask[b, t_b])`` averaged over heads, with post-RoPE queries
and keys (GQA handled by grouping the query heads over their key/value head). That is B x H x T work per captured
layer, against the forward's B x T x T x H. The mask function registered under the same name is transformers'
``sdpa_mask`` (without it, transformers would build no mask at all for an unknown implementation name).

Imports nothing from the rest of rewardkit but its errors: ``loading`` registers it, ``abc`` reads the rows.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from rewardkit.core.errors import ConfigError

ATTN_NAME = "abc_sdpa"

__all__ = ["ATTN_NAME", "AttentionCapture", "abc_sdpa_attention", "attention_row", "capture", "register_attention"]


# --- the captured row -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionCapture:
    """What one forward collects: for each selected layer, the head-mean attention row of each batch item's query
    position. ``positions``: (B,) query index per row, in the padded batch's coordinates."""

    layers: frozenset[int]
    positions: torch.Tensor
    rows: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, T_k) float32

    def mean_row(self) -> torch.Tensor:
        """(B, T_k): the rows averaged over the captured layers."""
        missing = self.layers - set(self.rows)
        if missing:
            raise ConfigError(
                f"no attention captured for layers {sorted(missing)}: dense rewards need the model loaded with "
                f"attn_implementation={ATTN_NAME!r} (rewardkit.core.loading does this by default)")
        if len(self.layers) == 1:
            return self.rows[next(iter(self.layers))]
        return torch.stack([self.rows[i] for i in sorted(self.layers)]).mean(0)


_CAPTURE: contextvars.ContextVar[AttentionCapture | None] = contextvars.ContextVar("rewardkit_abc_capture", default=None)


@contextlib.contextmanager
def capture(layers: Sequence[int], positions: torch.Tensor) -> Iterator[AttentionCapture]:
    """Capture the attention rows at ``positions`` (B,) for ``layers`` during forwards run inside the block."""
    cap = AttentionCapture(frozenset(int(i) for i in layers), positions)
    token = _CAPTURE.set(cap)
    try:
        yield cap
    finally:
        _CAPTURE.reset(token)


def attention_row(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                  scaling: float | None, positions: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention of query position ``positions[b]`` over all keys of row b. Returns (B, T_k) fp32.

    ``query``: (B, Hq, Tq, D) post-RoPE; ``key``: (B, Hkv, Tk, D) post-RoPE, Hq a multiple of Hkv (GQA);
    ``attention_mask``: None (pure causal), a bool mask (True = attend) or an additive float mask, (B|1, 1|H, Tq, Tk).
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    rep = hq // hkv
    scale = d**-0.5 if scaling is None else scaling
    if b == 1:  # the CPU server's unpadded single items: plain slicing, no advanced indexing (fewer small ops)
        p = int(positions[0])
        q = query[:, :, p].float()  # (1, Hq, D)
    else:
        rows = torch.arange(b, device=query.device)
        pos = positions.to(query.device)
        q = query[rows, :, pos].float()  # (B, Hq, D)
    q = q.reshape(b, hkv, rep, d)  # query heads grouped by their KV head (GQA without repeat_kv)
    scores = torch.matmul(q, key.float().transpose(-1, -2)).reshape(b, hq, tk) * scale  # (B, Hq, Tk)
    if attention_mask is None:  # pure causal: keys up to the query's position (keys may include a cache)
        if b == 1:
            last = p + (tk - tq)
            out = torch.zeros(1, tk, dtype=torch.float32, device=query.device)
            out[:, :last + 1] = torch.softmax(scores[:, :, :last + 1], dim=-1).mean(1)
            return out
        k_pos = torch.arange(tk, device=query.device)  # (Tk,)
        allowed = k_pos[None, :] <= (pos + (tk - tq))[:, None]  # (B, Tk)
        scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    else:
        m = attention_mask[:, 0]  # (B|1, Tq, Tk): the mask is shared by heads in every model we support
        m = m[:, p][:, None].expand(b, 1, tk)[:, 0] if b == 1 else m.expand(b, -1, -1)[rows, pos]  # (B, Tk)
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m[:, None, :], float("-inf"))
        else:
            scores = scores + m.float()[:, None, :]
    return torch.softmax(scores, dim=-1).mean(1)  # (B, Tk)


def abc_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, plus the ABC row for the captured layers while a capture is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap = _CAPTURE.get()
    if cap is not None and getattr(module, "layer_idx", None) in cap.layers:
        cap.rows[int(module.layer_idx)] = attention_row(  # type: ignore[arg-type]
            query, key, attention_mask, kwargs.get("scaling"), cap.positions)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)  # type: ignore[no-any-return]


def register_attention() -> str:
    """Register ``abc_sdpa`` (attention function + SDPA's mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, abc_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
