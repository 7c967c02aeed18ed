"""RRM: augmentation (counts, labels, no self-pairs, seeded determinism), the tie/BT mixed loss and its gradient, the
filter, and an end-to-end frozen run on a tiny Llama whose checkpoint the server's loader reads unchanged."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from rewardkit.core.loading import load_reward_model
from rewardkit.core.losses import bt_loss, bt_tie_loss
from rewardkit.training.rrm import (
    KINDS,
    SLOTS_PER_EXAMPLE,
    Comparison,
    RRMConfig,
    augment,
    draw_partners,
    filter_comparisons,
    rrm_loss,
    train_rrm,
)


@pytest.mark.parametrize("n", [2, 3, 7, 50])
def test_partners_never_self_and_are_permutations(n: int) -> None:
    for seed in range(20):
        j, k = draw_partners(n, seed)
        assert all(j[i] != i and k[i] != i for i in range(n))
        assert sorted(j) == list(range(n)) and sorted(k) == list(range(n))


def test_partners_deterministic_and_independent() -> None:
    assert draw_partners(40, 5) == draw_partners(40, 5)
    assert draw_partners(40, 5) != draw_partners(40, 6)
    j, k = draw_partners(40, 5)
    assert j != k  # two independent shuffles, not one reused
    with pytest.raises(ValueError, match="at least 2"):
        draw_partners(1, 0)


def test_augment_counts_labels_and_slots() -> None:
    n = 9
    slots, comps = augment(n, seed=3)
    assert len(slots) == SLOTS_PER_EXAMPLE * n
    kinds = Counter(c.kind for c in comps)
    assert kinds == {"original": n, "chosen_vs_off": 4 * n, "rejected_vs_off": 4 * n, "tie": 6 * n}
    assert len(comps) == 15 * n  # the pair itself + 14 triplets
    j, k = draw_partners(n, 3)
    for i in range(n):
        base = SLOTS_PER_EXAMPLE * i
        assert slots[base:base + 6] == [(i, i, "chosen"), (i, i, "rejected"), (i, j[i], "chosen"),
                                        (i, j[i], "rejected"), (i, k[i], "chosen"), (i, k[i], "rejected")]
        mine = [c for c in comps if c.example == i]
        # every comparison is on prompt x_i, and only off-prompt responses come from another example
        assert all(slots[c.a][0] == i and slots[c.b][0] == i for c in mine)
        assert all(slots[s][1] != i for c in mine if c.kind != "original" for s in (c.b,))
        for c in mine:
            if c.kind in ("chosen_vs_off", "rejected_vs_off"):
                assert c.label == 1.0 and slots[c.a][1] == i
                assert slots[c.a][2] == ("chosen" if c.kind == "chosen_vs_off" else "rejected")
            elif c.kind == "tie":
                assert c.label == 0.5 and slots[c.a][1] != i
        ties = {(c.a, c.b) for c in mine if c.kind == "tie"}
        assert ties == set(itertools.combinations(range(base + 2, base + 6), 2))  # every pair among the 4, once
    assert augment(n, seed=3) == (slots, comps)
    assert augment(n, seed=4)[0] != slots


def test_rrm_loss_matches_bt_and_tie_losses() -> None:
    ra, rb = torch.tensor([2.0, -1.0, 0.3, 1.5]), torch.tensor([0.0, 1.0, 0.3, -0.5])
    lab = torch.tensor([1.0, 1.0, 0.5, 0.5])
    mixed = rrm_loss(ra, rb, lab)
    expected = (2 * bt_loss(ra[:2], rb[:2]) + 2 * bt_tie_loss(ra[2:], rb[2:])) / 4
    assert float(mixed) == pytest.approx(float(expected), rel=1e-6)
    assert float(rrm_loss(ra[:2], rb[:2], lab[:2])) == pytest.approx(float(bt_loss(ra[:2], rb[:2])), rel=1e-6)
    # tie closed form: -[0.5 log s(d) + 0.5 log s(-d)], log 2 at d = 0
    d = 2.0
    closed = -(0.5 * math.log(1 / (1 + math.exp(-d))) + 0.5 * math.log(1 / (1 + math.exp(d))))
    assert float(rrm_loss(torch.tensor([d]), torch.tensor([0.0]), torch.tensor([0.5]))) == pytest.approx(closed)
    assert float(rrm_loss(torch.tensor([0.4]), torch.tensor([0.4]), torch.tensor([0.5]))) == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="1.0"):
        rrm_loss(ra, rb, torch.tensor([1.0, 0.0, 0.5, 0.5]))


def test_tie_gradient_pulls_rewards_together() -> None:
    ra = torch.tensor([1.0], requires_grad=True)
    rb = torch.tensor([-1.0], requires_grad=True)
    rrm_loss(ra, rb, torch.tensor([0.5])).backward()
    # d/d r_a of the tie loss = sigmoid(d) - 0.5 > 0 for d = 2: descent lowers r_a and raises r_b
    s = 1 / (1 + math.exp(-2.0))
    assert float(ra.grad) == pytest.approx(s - 0.5, rel=1e-5)
    assert float(rb.grad) == pytest.approx(-(s - 0.5), rel=1e-5)
    ra2, rb2 = torch.tensor([0.7], requires_grad=True), torch.tensor([0.7], requires_grad=True)
    rrm_loss(ra2, rb2, torch.tensor([0.5])).backward()
    assert float(ra2.grad) == pytest.approx(0.0, abs=1e-7)  # minimum at d = 0


def test_filter_drops_what_the_baseline_gets_right() -> None:
    comps = [Comparison(0, 1, 1.0, "original", 0),
             Comparison(0, 2, 1.0, "chosen_vs_off", 0),   # baseline right and confident: dropped
             Comparison(1, 2, 1.0, "rejected_vs_off", 0),  # baseline wrong: kept
             Comparison(2, 3, 0.5, "tie", 0),              # baseline says equal: dropped
             Comparison(2, 4, 0.5, "tie", 0)]              # baseline strongly prefers one: kept
    r = torch.tensor([3.0, -2.0, 0.0, 0.1, 4.0])
    kept, counts = filter_comparisons(comps, r, tau=0.2)
    assert [c.b for c in kept] == [1, 2, 4] and kept[0].kind == "original"
    assert counts == {"total": {"chosen_vs_off": 1, "rejected_vs_off": 1, "tie": 2},
                      "kept": {"chosen_vs_off": 0, "rejected_vs_off": 1, "tie": 1}}
    assert set(counts["kept"]) == set(KINDS)
    everything, c0 = filter_comparisons(comps, r, tau=0.0)  # tau 0 keeps all
    assert len(everything) == len(comps) and c0["kept"] == c0["total"]
    # a model that gets every augmented triplet right drops all of them
    perfect = torch.tensor([5.0, 5.0, -5.0, -5.0, -5.0])
    kept_p, _ = filter_comparisons(comps, perfect, tau=0.2)
    assert [c.kind for c in kept_p] == ["original"]


def _rows(n: int = 16) -> list[dict[str, object]]:
    return [{"prompt": f"What is {3 + i} + {11 + 2 * i}?", "chosen": f"{3 + i} + {11 + 2 * i} = {14 + 3 * i}.",
             "rejected": f"{3 + i} + {11 + 2 * i} = {15 + 3 * i}. I hope this helps!"} for i in range(n)]


def test_train_rrm_frozen_end_to_end(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    kw = dict(model=str(tiny_llama_dir), train_file=str(data), device="cpu", num_epochs=3, batch_size=16,
              learning_rate=5e-2, logging_steps=1, disable_tqdm=True, max_length=64, seed=2)
    res = train_rrm(RRMConfig(output_dir=str(tmp_path / "a"), **kw), command="test")  # type: ignore[arg-type]
    aug = res.metrics["augmentation"]
    assert aug["total"] == {"chosen_vs_off": 64, "rejected_vs_off": 64, "tie": 96}
    assert all(0 <= aug["kept"][k] <= aug["total"][k] for k in KINDS)
    assert res.metrics["train_comparisons"] == 16 + sum(aug["kept"].values())
    assert res.steps == math.ceil(res.metrics["train_comparisons"] / 16) * 3
    loaded = load_reward_model(tmp_path / "a")  # the server's loader, unchanged
    assert loaded.meta.provenance["trainer"] == "rrm"
    assert loaded.meta.provenance["augmentation"] == {k: aug[k] for k in ("total", "kept", "used")}
    assert aug["used"] == aug["kept"]  # augment_ratio 0: every kept comparison is used
    assert torch.equal(loaded.head.weight, res.rm.head.weight)
    assert (tmp_path / "a" / "baseline_log.jsonl").is_file()
    with pytest.raises(ValueError, match="augment_ratio"):
        RRMConfig(output_dir="x", train_file="y", augment_ratio=-1).validate()
    with pytest.raises(ValueError, match="tau"):
        RRMConfig(output_dir="x", train_file="y", tau=1.5).validate()


def _comps(n_pairs: int) -> list[Comparison]:
    _, comps = augment(n_pairs, seed=0)
    return comps


def test_subsample_keeps_originals_caps_augmented_and_is_seeded() -> None:
    from rewardkit.training.rrm import subsample_comparisons

    comps = _comps(20)  # 20 originals + 280 augmented
    used, counts = subsample_comparisons(comps, 20, ratio=1.0, seed=3)
    assert [c.kind for c in used[:20]] == ["original"] * 20 and len(used) == 40  # 1:1, as BT's budget
    assert sum(counts.values()) == 20 and set(counts) == set(KINDS)
    assert all(c in comps for c in used)
    again, _ = subsample_comparisons(comps, 20, ratio=1.0, seed=3)
    other, _ = subsample_comparisons(comps, 20, ratio=1.0, seed=4)
    assert again == used and other != used
    all_, counts_all = subsample_comparisons(comps, 20, ratio=0.0, seed=3)  # 0 = keep every comparison
    assert all_ == comps and counts_all == {"chosen_vs_off": 80, "rejected_vs_off": 80, "tie": 120}
    big, _ = subsample_comparisons(comps, 20, ratio=100.0, seed=3)  # a cap above what was kept changes nothing
    assert big == comps


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_train_rrm_backbone_modes_round_trip(tiny_llama_dir: Path, tmp_path: Path, mode: str) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(8)), encoding="utf-8")
    out = tmp_path / mode
    cfg = RRMConfig(model=str(tiny_llama_dir), train_file=str(data), output_dir=str(out), device="cpu", mode=mode,
                    num_epochs=1, batch_size=4, learning_rate=1e-3, head_learning_rate=1e-2, lora_r=4,
                    augment_ratio=1.0, tau=0.0, logging_steps=1, disable_tqdm=True, max_length=64, seed=2)
    base = load_reward_model(tiny_llama_dir)
    res = train_rrm(cfg, command="test")
    aug = res.metrics["augmentation"]
    assert sum(aug["used"].values()) == 8 and res.metrics["train_comparisons"] == 16  # 8 originals + 8 augmented
    assert res.steps == math.ceil(16 / 4)
    # the head started from the baseline BT head (never at zero, which would give the backbone no gradient)
    baseline_steps = [json.loads(x) for x in (out / "baseline_log.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in baseline_steps)
    if mode == "lora":
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
    else:
        assert (out / "backbone" / "config.json").is_file()
        moved = [not torch.equal(p, q) for p, q in zip(res.rm.model.parameters(), base.model.parameters(),
                                                      strict=True)]
        assert sum(moved) >= len(moved) - 1
    loaded = load_reward_model(out)  # the server's loader, unchanged
    assert loaded.meta.provenance["trainer"] == "rrm" and loaded.meta.provenance["mode"] == mode
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.scoring import Scorer

    items = [Formatter(m.tokenizer, max_length=64).encode(ScoreItem(prompt="What is 3 + 11?", response=r), i)
             for m in (loaded,) for i, r in enumerate(["3 + 11 = 14.", "3 + 11 = 15. I hope this helps!"])]
    assert [s.raw_reward for s in Scorer(loaded).score_batch(items)] == pytest.approx(
        [s.raw_reward for s in Scorer(res.rm).score_batch(items)], rel=1e-4, abs=1e-5)
