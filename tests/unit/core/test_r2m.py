"""Tests for rewardkit.core.r2m: the R2M head, the w(t) schedule, GREBT and the online update step."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rewardkit.core.errors import InputError, ModelLoadError
from rewardkit.core.r2m import (
    GroupSizeError,
    R2MBatch,
    R2MConfig,
    R2MHead,
    grebt_loss,
    load_head,
    make_optimizer,
    mix_weight,
    r2m_update_step,
    read_head_metadata,
    save_head,
)

D_RM, D_P, D_ATTN, S = 16, 12, 8, 6


def _cfg(**kw: object) -> R2MConfig:
    base: dict = {"d_rm": D_RM, "d_policy": D_P, "d_attn": D_ATTN, "total_rounds": 10}
    return R2MConfig(**{**base, **kw})


def _inputs(b: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h_last = torch.randn(b, D_RM, generator=g)  # (B, D_rm)
    hidden = torch.randn(b, S, D_P, generator=g)  # (B, S, D_p)
    mask = torch.ones(b, S, dtype=torch.bool)  # (B, S)
    mask[1, 4:] = False
    mask[3, 1:] = False
    return h_last, hidden, mask


def _random_head(bias: bool = True, seed: int = 0) -> tuple[R2MHead, nn.Linear]:
    torch.manual_seed(seed)
    score = nn.Linear(D_RM, 1, bias=bias)
    head = R2MHead.from_scalar_head(score, _cfg())
    with torch.no_grad():  # a trained-looking head: W_o no longer zero, so H_agg is not trivially 0
        head.w_o.weight.normal_(std=0.5)
    return head, score


# -- shapes and exactness ------------------------------------------------------------------------


def test_shapes_and_d_attn_option() -> None:
    head, _ = _random_head()
    h_last, hidden, mask = _inputs()
    assert head.w_q.weight.shape == (D_ATTN, D_RM) and head.w_k.weight.shape == (D_ATTN, D_P)
    assert head.w_v.weight.shape == (D_ATTN, D_P) and head.w_o.weight.shape == (D_RM, D_ATTN)
    assert head.attention(h_last, hidden, mask).shape == (5, S)
    assert head.aggregate(h_last, hidden, mask).shape == (5, D_RM)
    assert head(h_last, hidden, mask, w=0.7).shape == (5,)
    assert R2MHead(R2MConfig(d_rm=4, d_policy=3)).w_q.weight.shape == (2048, 4)  # the paper's d by default


@pytest.mark.parametrize("bias", [True, False])
def test_w_equal_one_reproduces_the_scalar_head_bitwise(bias: bool) -> None:
    head, score = _random_head(bias=bias)
    h_last, hidden, mask = _inputs(b=7)
    assert head.aggregate(h_last, hidden, mask).abs().sum() > 0  # the branch is live, yet ignored at w=1
    got = head(h_last, hidden, mask, w=1.0)
    want = score(h_last).squeeze(-1)
    assert torch.equal(got, want), (got - want).abs().max()
    assert not torch.equal(head(h_last, hidden, mask, w=0.9), want)


def test_untrained_head_only_rescales_the_rm_reward() -> None:
    torch.manual_seed(1)
    score = nn.Linear(D_RM, 1)
    head = R2MHead.from_scalar_head(score, _cfg())
    h_last, hidden, mask = _inputs()
    with torch.no_grad():
        got = head(h_last, hidden, mask, w=0.65)
        want = 0.65 * (score(h_last).squeeze(-1) - score.bias) + score.bias
    torch.testing.assert_close(got, want)


def test_from_scalar_head_validates_the_score_head() -> None:
    with pytest.raises(ValueError, match="out_features=1"):
        R2MHead.from_scalar_head(nn.Linear(D_RM, 2), _cfg())
    with pytest.raises(ValueError, match="d_rm=16"):
        R2MHead.from_scalar_head(nn.Linear(D_RM + 1, 1), _cfg())


def test_bad_input_shapes_name_the_field() -> None:
    head, _ = _random_head()
    h_last, hidden, mask = _inputs()
    with pytest.raises(InputError) as ei:
        head(h_last, torch.randn(5, S, D_P + 1), mask, w=0.5)
    assert ei.value.field == "policy_hidden" and f"(B, S, {D_P})" in str(ei.value)
    with pytest.raises(InputError) as ei:
        head(h_last[:, :-1], hidden, mask, w=0.5)
    assert ei.value.field == "h_last"
    bad = mask.clone()
    bad[2] = False
    with pytest.raises(InputError, match="at least one unmasked"):
        head(h_last, hidden, bad, w=0.5)
    with pytest.raises(ValueError, match="mix weight"):
        head(h_last, hidden, mask, w=1.5)


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="R2MConfig.d_attn"):
        _cfg(d_attn=0)
    with pytest.raises(ValueError, match="R2MConfig.omega"):
        _cfg(omega=1.2)
    with pytest.raises(ValueError, match="unknown fields"):
        R2MConfig.from_dict({"d_rm": 2, "d_policy": 2, "bogus": 1})


# -- schedule ------------------------------------------------------------------------------------


def test_mix_weight_schedule() -> None:
    assert mix_weight(0, 100, 0.65) == 1.0
    assert mix_weight(100, 100, 0.65) == 0.65
    assert mix_weight(25, 100, 0.65) == pytest.approx(0.5 * math.cos(math.pi / 4) + 0.5)  # 0.8536
    assert mix_weight(50, 100, 0.65) == 0.65  # cos part is 0.5 < omega
    assert mix_weight(50, 100, 0.3) == pytest.approx(0.5)
    assert mix_weight(250, 100, 0.3) == 0.3  # clamped past T, no second cosine period
    ws = [mix_weight(t, 40, 0.6) for t in range(41)]
    assert all(a >= b for a, b in zip(ws, ws[1:], strict=False))
    for args in ((-1, 10, 0.5), (1, 0, 0.5), (1, 10, 1.5)):
        with pytest.raises(ValueError):
            mix_weight(*args)


# -- masking -------------------------------------------------------------------------------------


def test_padded_positions_get_zero_attention_and_cannot_change_the_output() -> None:
    head, _ = _random_head()
    h_last, hidden, mask = _inputs()
    attn = head.attention(h_last, hidden, mask)
    assert torch.all(attn[~mask] == 0)
    assert torch.all(attn[mask] > 0)
    torch.testing.assert_close(attn.sum(-1), torch.ones(5))
    before = head(h_last, hidden, mask, w=0.4)
    for fill in (1e4, float("nan"), float("inf")):
        other = hidden.clone()
        other[~mask] = fill
        assert torch.equal(head(h_last, other, mask, w=0.4), before)
    changed = hidden.clone()
    changed[0, 0] += 1.0  # a real position does matter
    assert not torch.equal(head(h_last, changed, mask, w=0.4), before)


def test_integer_mask_is_accepted() -> None:
    head, _ = _random_head()
    h_last, hidden, mask = _inputs()
    assert torch.equal(head(h_last, hidden, mask.long(), w=0.5), head(h_last, hidden, mask, w=0.5))


# -- GREBT ---------------------------------------------------------------------------------------


def _bt(d: float) -> float:
    return -math.log(1.0 / (1.0 + math.exp(-d)))


def _entropy_of_standardised(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))
    z = [(x - m) / (sd + 1e-6) for x in xs]
    e = [math.exp(v) for v in z]
    p = [v / sum(e) for v in e]
    return -sum(pi * math.log(pi) for pi in p)


def test_grebt_matches_a_hand_computation() -> None:
    r = torch.tensor([1.0, 0.0, 3.0, 2.0, -1.0, 0.5, 4.0], dtype=torch.float64)
    gids = ["a", "b", "a", "a", "b", "b", "b"]  # groups: a = {0, 2, 3}, b = {1, 4, 5, 6}
    loss, stats = grebt_loss(r, gids, alpha=0.3)
    bt = (_bt(3.0 - 1.0) + _bt(4.0 - (-1.0))) / 2
    gre = (_entropy_of_standardised([1.0, 3.0, 2.0]) + _entropy_of_standardised([0.0, -1.0, 0.5, 4.0])) / 2
    assert stats["n_groups"] == 2 and stats["n_tied"] == 0
    assert stats["bt"] == pytest.approx(bt, rel=1e-9) and stats["gre"] == pytest.approx(gre, rel=1e-9)
    assert float(loss) == pytest.approx(0.7 * bt + 0.3 * gre, rel=1e-9)
    assert stats["margin"] == pytest.approx((2.0 + 5.0) / 2)


def test_pseudo_pairs_come_from_scores_for_labels() -> None:
    r = torch.tensor([1.0, 2.0, 3.0])
    _, own = grebt_loss(r, ["g"] * 3, alpha=0.0)
    _, flipped = grebt_loss(r, ["g"] * 3, scores_for_labels=-r, alpha=0.0)
    assert own["bt"] == pytest.approx(_bt(2.0)) and flipped["bt"] == pytest.approx(_bt(-2.0))


def test_tied_groups_have_no_pair() -> None:
    r = torch.tensor([1.0, 1.0, 0.0, 2.0], requires_grad=True)
    loss, stats = grebt_loss(r, ["t", "t", "u", "u"], alpha=0.3)
    assert stats["n_tied"] == 1 and stats["bt"] == pytest.approx(_bt(2.0))
    loss.backward()
    assert r.grad is not None and torch.isfinite(r.grad).all()


def test_group_of_one_is_rejected_naming_the_group() -> None:
    with pytest.raises(GroupSizeError, match="'lonely'") as ei:
        grebt_loss(torch.zeros(3), ["x", "x", "lonely"])
    assert isinstance(ei.value, ValueError) and ei.value.group_id == "lonely"
    with pytest.raises(InputError, match="group_ids has 2 entries for 3"):
        grebt_loss(torch.zeros(3), ["x", "x"])


def test_gre_carries_gradient() -> None:
    r = torch.tensor([0.3, -1.0, 2.0, 0.1], requires_grad=True)
    loss, _ = grebt_loss(r, ["g"] * 4, alpha=1.0)
    loss.backward()
    assert r.grad is not None and r.grad.abs().sum() > 0


# -- the update step -----------------------------------------------------------------------------


def _batch(h_last: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int) -> R2MBatch:
    return R2MBatch(h_last, hidden, mask, [f"p{i // k}" for i in range(h_last.shape[0])])


def test_update_trains_only_the_head_and_every_head_parameter_changes() -> None:
    torch.manual_seed(0)
    body = nn.Linear(10, D_RM)  # stands in for the frozen RM body
    head = R2MHead.from_scalar_head(nn.Linear(D_RM, 1), _cfg(lr=1e-2))
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    body_before = body.weight.detach().clone()
    opt = make_optimizer(head)
    hidden = torch.randn(8, S, D_P, requires_grad=True)
    mask = torch.ones(8, S, dtype=torch.bool)
    for _ in range(3):  # W_o starts at 0: W_q, W_k, W_v get gradient from the second step on
        stats = r2m_update_step(head, opt, _batch(body(torch.randn(8, 10)), hidden, mask, 4), w=0.5)
        assert stats["applied"] == 1.0 and stats["n_groups"] == 2.0 and math.isfinite(stats["loss"])
    assert body.weight.grad is None and hidden.grad is None
    assert torch.equal(body.weight, body_before)
    for n, p in head.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"


def test_optimizer_with_foreign_parameters_is_refused() -> None:
    head = R2MHead(_cfg())
    opt = torch.optim.AdamW([*head.parameters(), nn.Parameter(torch.zeros(2))])
    h_last, hidden, mask = _inputs(b=4)
    with pytest.raises(ValueError, match="outside the R2M head"):
        r2m_update_step(head, opt, _batch(h_last, hidden, mask, 2), w=0.5)


def test_non_finite_loss_applies_nothing() -> None:
    head, _ = _random_head()
    opt = make_optimizer(head)
    h_last, hidden, mask = _inputs(b=4)
    h_last[0, 0] = float("inf")
    before = {n: p.detach().clone() for n, p in head.named_parameters()}
    stats = r2m_update_step(head, opt, _batch(h_last, hidden, mask, 2), w=0.5)
    assert stats["applied"] == 0.0
    for n, p in head.named_parameters():
        assert torch.equal(p, before[n]), n


# -- a synthetic alignment problem ---------------------------------------------------------------

K = 4
_QUALITY_DIR = torch.nn.functional.normalize(
    torch.randn(D_P, generator=torch.Generator().manual_seed(7)), dim=0
)


def _synthetic(n_groups: int, g: torch.Generator, noise_feedback: bool) -> tuple[torch.Tensor, R2MBatch]:
    """True quality q; the RM reads it with heavy noise (reward = q + 1.5 n); the policy's hidden
    states carry q cleanly along a fixed direction (or, for the ablation, carry nothing)."""
    n = n_groups * K
    q = torch.randn(n, generator=g)  # (N,)
    h_last = 0.5 * torch.randn(n, D_RM, generator=g)  # (N, D_rm)
    h_last[:, 0] = q + 1.5 * torch.randn(n, generator=g)
    hidden = 0.5 * torch.randn(n, S, D_P, generator=g)  # (N, S, D_p)
    if not noise_feedback:
        hidden = hidden + 2.0 * q[:, None, None] * _QUALITY_DIR  # (N, S, D_p)
    mask = torch.ones(n, S, dtype=torch.bool)
    mask[::3, S // 2 :] = False
    return q, _batch(h_last, hidden, mask, K)


def _pair_accuracy(head: R2MHead, q: torch.Tensor, b: R2MBatch, w: float) -> float:
    """Fraction of groups whose pseudo-pair (argmax, argmin of the head's reward) is right on true quality."""
    with torch.no_grad():
        r = head(b.h_last, b.policy_hidden, b.mask, w=w).view(-1, K)  # (G, K)
    qq = q.view(-1, K)  # (G, K)
    win = qq.gather(1, r.argmax(1, keepdim=True))
    lose = qq.gather(1, r.argmin(1, keepdim=True))
    return float((win > lose).float().mean())


def _run(noise_feedback: bool, steps: int = 40) -> tuple[float, float, list[float]]:
    torch.manual_seed(0)
    score = nn.Linear(D_RM, 1, bias=False)
    with torch.no_grad():
        score.weight.zero_()
        score.weight[0, 0] = 1.0
    head = R2MHead.from_scalar_head(score, _cfg(lr=1e-2))
    opt = make_optimizer(head)
    q_eval, b_eval = _synthetic(200, torch.Generator().manual_seed(999), noise_feedback)
    acc0 = _pair_accuracy(head, q_eval, b_eval, 0.5)
    g = torch.Generator().manual_seed(1)
    losses = [
        r2m_update_step(head, opt, _synthetic(32, g, noise_feedback)[1], w=0.5)["loss"] for _ in range(steps)
    ]
    return acc0, _pair_accuracy(head, q_eval, b_eval, 0.5), losses


def test_one_step_lowers_the_loss_on_its_batch() -> None:
    head, _ = _random_head()
    head.cfg.lr = 1e-3
    opt = make_optimizer(head)
    _, b = _synthetic(16, torch.Generator().manual_seed(3), False)
    labels = head(b.h_last, b.policy_hidden, b.mask, w=0.5).detach()
    stats = r2m_update_step(head, opt, b, w=0.5)
    after, _ = grebt_loss(head(b.h_last, b.policy_hidden, b.mask, w=0.5), b.group_ids, labels)
    assert float(after.detach()) < stats["loss"]


def test_real_feedback_improves_pseudo_pair_accuracy_and_noise_does_not() -> None:
    acc0, acc1, losses = _run(noise_feedback=False)
    assert sum(losses[-5:]) < sum(losses[:5])
    assert acc1 >= acc0 + 0.10, (acc0, acc1)  # measured: 0.82 -> 0.99
    n_acc0, n_acc1, _ = _run(noise_feedback=True)
    assert n_acc1 <= n_acc0 + 0.03, (n_acc0, n_acc1)  # the paper's ablation: noise brings no gain


# -- save / load ---------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path: os.PathLike[str]) -> None:
    head, _ = _random_head(bias=True)
    path = save_head(
        head, os.path.join(tmp_path, "heads", "v3.safetensors"), version=3, round=17, extra={"n": 1}
    )
    assert sorted(os.listdir(path.parent)) == ["v3.safetensors"]  # no temp file left behind
    meta = read_head_metadata(path)
    assert (meta["version"], meta["round"], meta["extra"]) == (3, 17, {"n": 1})
    assert meta["config"]["d_attn"] == D_ATTN and meta["format_version"] == 1
    loaded, meta2 = load_head(path)
    assert meta2 == meta and loaded.cfg == head.cfg
    h_last, hidden, mask = _inputs()
    for w in (1.0, 0.6):
        assert torch.equal(loaded(h_last, hidden, mask, w=w), head(h_last, hidden, mask, w=w))
    assert set(load_file(str(path))) == {n for n, _ in head.named_parameters()}  # plain safetensors


def test_load_refuses_foreign_or_mismatched_files(tmp_path: os.PathLike[str]) -> None:
    plain = os.path.join(tmp_path, "plain.safetensors")
    save_file({"weight": torch.zeros(1, 4)}, plain)
    with pytest.raises(ModelLoadError, match="not an R2M head"):
        load_head(plain)
    with pytest.raises(ModelLoadError, match="cannot read"):
        load_head(os.path.join(tmp_path, "missing.safetensors"))
    head, _ = _random_head()
    path = save_head(head, os.path.join(tmp_path, "h.safetensors"), version=1, round=0)
    tensors = load_file(str(path))
    tensors["w_k.weight"] = torch.zeros(D_ATTN, D_P + 1)
    meta = {"rewardkit.r2m": json.dumps(read_head_metadata(path))}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ModelLoadError, match="do not match"):
        load_head(path)
