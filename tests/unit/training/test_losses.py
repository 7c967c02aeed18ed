"""Preference losses: values against closed forms, margins, centring, ties, validation."""

from __future__ import annotations

import math

import pytest
import torch

from rewardkit.core.losses import bt_loss, bt_tie_loss, pair_stats


def test_bt_loss_closed_form() -> None:
    rc, rr = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = sum(math.log1p(math.exp(-(c - r))) for c, r in zip(rc.tolist(), rr.tolist(), strict=True)) / 3
    assert float(bt_loss(rc, rr)) == pytest.approx(expected, rel=1e-6)
    assert float(bt_loss(torch.tensor([1.0]), torch.tensor([1.0]))) == pytest.approx(math.log(2), rel=1e-6)


def test_margin_is_subtracted() -> None:
    rc, rr, m = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])
    assert float(bt_loss(rc, rr, margin=m)) == pytest.approx(math.log(2), rel=1e-6)
    assert float(bt_loss(rc, rr, margin=m)) > float(bt_loss(rc, rr))


def test_center_rewards_coefficient_as_trl() -> None:
    rc, rr = torch.tensor([3.0, 1.0]), torch.tensor([1.0, -2.0])
    plain = float(bt_loss(rc, rr))
    centred = float(bt_loss(rc, rr, center_rewards_coefficient=0.01))
    assert centred == pytest.approx(plain + 0.01 * ((4.0**2 + (-1.0) ** 2) / 2), rel=1e-6)


def test_bt_gradient_pushes_apart() -> None:
    rc = torch.tensor([0.0], requires_grad=True)
    rr = torch.tensor([0.0], requires_grad=True)
    bt_loss(rc, rr).backward()
    assert rc.grad is not None and rr.grad is not None
    assert float(rc.grad) == pytest.approx(-0.5) and float(rr.grad) == pytest.approx(0.5)


def test_tie_loss_minimal_at_equal_and_symmetric() -> None:
    a, b = torch.tensor([0.5, 2.0]), torch.tensor([0.5, -1.0])
    assert float(bt_tie_loss(a[:1], b[:1])) == pytest.approx(math.log(2), rel=1e-6)
    assert float(bt_tie_loss(a, b)) == pytest.approx(float(bt_tie_loss(b, a)), rel=1e-6)
    d = 3.0
    expected = -(0.5 * math.log(1 / (1 + math.exp(-d))) + 0.5 * math.log(1 / (1 + math.exp(d))))
    assert float(bt_tie_loss(a[1:], b[1:])) == pytest.approx(expected, rel=1e-6)


def test_pair_stats_counts_ties_half() -> None:
    s = pair_stats(torch.tensor([1.0, 0.0, 2.0, 5.0]), torch.tensor([0.0, 1.0, 2.0, 1.0]))
    assert s["accuracy"] == pytest.approx(2.5 / 4)
    assert s["margin"] == pytest.approx((1 - 1 + 0 + 4) / 4)


def test_shape_errors_name_the_shapes() -> None:
    with pytest.raises(ValueError, match=r"\(2,\) and \(3,\)"):
        bt_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="margin must have shape"):
        bt_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
