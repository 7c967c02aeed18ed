"""Preference losses shared by the trainers and the online updater.

* :func:`bt_loss` — Bradley-Terry: ``-log sigmoid(r_c - r_r - margin)``, mean over pairs, plus TRL's optional
  ``center_rewards_coefficient * mean((r_c + r_r)^2)`` that keeps rewards centred on zero (Eisenstein et al. 2023).
* :func:`bt_tie_loss` — for pairs labelled as ties: ``-[0.5 log sigmoid(d) + 0.5 log sigmoid(-d)]`` with
  ``d = r_a - r_b``; minimal (``log 2``) at ``d = 0``.
* :func:`pair_stats` — accuracy and mean margin, what the trainers log next to the loss.

Example::

    loss = bt_loss(r_chosen, r_rejected, margin=None, center_rewards_coefficient=0.01)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["bt_loss", "bt_tie_loss", "pair_stats"]


def _check_pair(r_a: torch.Tensor, r_b: torch.Tensor) -> None:
    if r_a.shape != r_b.shape or r_a.dim() != 1:
        raise ValueError(f"rewards must be two 1-D tensors of the same shape, got {tuple(r_a.shape)} "
                         f"and {tuple(r_b.shape)}")


def bt_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
            center_rewards_coefficient: float | None = None) -> torch.Tensor:
    """Bradley-Terry loss, mean over the batch. Shapes: ``(B,)`` each; ``margin`` ``(B,)`` or None.

    Example::

        >>> bt_loss(torch.tensor([1.0]), torch.tensor([1.0]))   # log 2
        tensor(0.6931)
    """
    _check_pair(r_chosen, r_rejected)
    diff = r_chosen - r_rejected  # (B,)
    if margin is not None:
        if margin.shape != diff.shape:
            raise ValueError(f"margin must have shape {tuple(diff.shape)}, got {tuple(margin.shape)}")
        diff = diff - margin.to(diff.dtype)
    loss = -F.logsigmoid(diff).mean()
    if center_rewards_coefficient:
        loss = loss + center_rewards_coefficient * torch.mean((r_chosen + r_rejected) ** 2)
    return loss


def bt_tie_loss(r_a: torch.Tensor, r_b: torch.Tensor) -> torch.Tensor:
    """Loss for tied pairs, mean over the batch: ``-[0.5 log sigmoid(d) + 0.5 log sigmoid(-d)]``, ``d = r_a - r_b``.

    Symmetric in ``a``/``b``; pushes the two rewards together.
    """
    _check_pair(r_a, r_b)
    d = r_a - r_b  # (B,)
    return -(0.5 * F.logsigmoid(d) + 0.5 * F.logsigmoid(-d)).mean()


@torch.no_grad()
def pair_stats(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """``accuracy`` (share with r_c > r_r; a tie counts half) and ``margin`` (mean r_c - r_r)."""
    _check_pair(r_chosen, r_rejected)
    diff = (r_chosen - r_rejected).float()  # (B,)
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return {"accuracy": float(acc), "margin": float(diff.mean())}
