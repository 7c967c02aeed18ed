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

__all__ = ["ATTN_NAME", "AttentionCapture", "abc_sdpa_attention", "attention_row", "attention_rows", "capture",
           "register_attention"]


# --- the captured row -----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AttentionCapture:
    """What one forward collects: for each selected layer, the head-mean attention row of each batch item's query
    position. ``positions``: (B,) query index per row, in the padded batch's coordinates."""

    layers: frozenset[int]
    positions: torch.Tensor
    rows: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, T_k) float32
    queries: torch.Tensor | None = None  # (B, Q) more query positions per item (-1 = none), for Id-RM's rows
    query_rows: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # layer -> (B, Q, T_k) float32

    def mean_query_rows(self) -> torch.Tensor:
        """(B, Q, T_k): the rows of ``queries`` averaged over the captured layers (all zeros where a query is -1)."""
        missing = self.layers - set(self.query_rows)
        if self.queries is None or missing:
            raise ConfigError(f"no query rows captured for layers {sorted(missing)}: pass queries= to capture() and "
                              f"load the model with attn_implementation={ATTN_NAME!r}")
        return torch.stack([self.query_rows[i] for i in sorted(self.layers)]).mean(0)

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
def capture(layers: Sequence[int], positions: torch.Tensor,
            queries: torch.Tensor | None = None) -> Iterator[AttentionCapture]:
    """Capture the attention rows at ``positions`` (B,) for ``layers`` during forwards run inside the block; with
    ``queries`` (B, Q), also the rows of those query positions (-1 = padding), as ``query_rows``."""
    cap = AttentionCapture(frozenset(int(i) for i in layers), positions, queries=queries)
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


def attention_rows(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                   scaling: float | None, queries: torch.Tensor) -> torch.Tensor:
    """Head-mean softmax attention rows of the query positions ``queries`` (B, Q) (-1 = none: a zero row).

    Same conventions as :func:`attention_row`; (B, Q, T_k) float32, with its autograd graph. B x Q x H x T work.
    """
    b, hq, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    rep = hq // hkv
    scale = d**-0.5 if scaling is None else scaling
    qi = queries.to(query.device).long()  # (B, Q)
    valid = qi >= 0
    qc = qi.clamp(min=0)
    nq = qi.shape[1]
    rows = torch.arange(b, device=query.device)[:, None].expand(b, nq)  # (B, Q)
    q = query.transpose(1, 2)[rows, qc].float()  # (B, Q, Hq, D)
    q = q.reshape(b, nq, hkv, rep, d).permute(0, 2, 1, 3, 4).reshape(b, hkv, nq * rep, d)  # grouped by KV head
    scores = torch.matmul(q, key.float().transpose(-1, -2))  # (B, Hkv, Q*rep, Tk)
    scores = scores.reshape(b, hkv, nq, rep, tk).permute(0, 2, 1, 3, 4).reshape(b, nq, hq, tk) * scale
    k_pos = torch.arange(tk, device=query.device)
    allowed = k_pos[None, None, :] <= (qc + (tk - tq))[..., None]  # (B, Q, Tk) causal
    if attention_mask is not None:
        m = attention_mask[:, 0].expand(b, -1, -1)[rows, qc]  # (B, Q, Tk)
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            scores = scores + m.float()[:, :, None, :]
    scores = scores.masked_fill(~allowed[:, :, None, :], float("-inf"))
    out = torch.softmax(scores, dim=-1).mean(2)  # (B, Q, Tk)
    return out * valid[..., None]


def abc_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, plus the ABC row for the captured layers while a capture is active."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cap = _CAPTURE.get()
    if cap is not None and getattr(module, "layer_idx", None) in cap.layers:
        cap.rows[int(module.layer_idx)] = attention_row(  # type: ignore[arg-type]
            query, key, attention_mask, kwargs.get("scaling"), cap.positions)
        if cap.queries is not None:
            cap.query_rows[int(module.layer_idx)] = attention_rows(  # type: ignore[arg-type]
                query, key, attention_mask, kwargs.get("scaling"), cap.queries)
    return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)  # type: ignore[no-any-return]


def register_attention() -> str:
    """Register ``abc_sdpa`` (attention function + SDPA's mask builder) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(ATTN_NAME, abc_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_NAME, sdpa_mask)
    return ATTN_NAME
