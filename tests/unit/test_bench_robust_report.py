"""bench/bench_robust.py's report: the table's mean/spread and the paired (McNemar) counts on stored margins."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("bench_robust", Path(__file__).parents[2] / "bench" / "bench_robust.py")
assert _spec and _spec.loader
br = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(br)


def _run(method: str, seed: int, margins: list[float], per_epoch: float | None = None) -> dict:
    acc = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    metrics = {"wall_seconds": 10.0 * (seed + 1)}
    if per_epoch is not None:
        metrics["seconds_per_epoch"] = per_epoch
    return {"method": method, "seed": seed, "metrics": metrics,
            "eval": {"test_late_evidence": acc, "test_late_evidence_margins": margins}}


def test_paired_counts_only_discordant_pairs_and_pools_seeds() -> None:
    runs = [_run("a", 0, [1, 1, -1, 1]), _run("b", 0, [1, -1, -1, -1]),
            _run("a", 1, [1, -1, 1, 1]), _run("b", 1, [-1, 1, 1, 1])]
    out = br.paired(runs, "a", "b")
    line = next(ln for ln in out.splitlines() if ln.startswith("test_late_evidence"))
    # seed 0: only a right on pairs 1 and 3; seed 1: only a on pair 0, only b on pair 1 -> pooled 3/1
    assert "s0: 2/0" in line and "s1: 1/1" in line and "pooled 3/1" in line
    assert "p=0.625" in line  # exact two-sided sign test, n=4, k=1: 2 * (1 + 4) / 16


def test_paired_rejects_margins_of_different_pairs() -> None:
    with pytest.raises(ValueError):
        br.paired([_run("a", 0, [1, 1]), _run("b", 0, [1, 1, 1])], "a", "b")


def test_table_mean_and_spread_over_seeds(tmp_path: Path) -> None:
    runs = [_run("idrm", 0, [1, 1, -1, -1], 4.0), _run("idrm", 1, [1, 1, 1, -1], 6.0)]  # 50 % and 75 %
    out = br.table(runs).splitlines()
    assert out[0].split()[:3] == ["method", "seeds", "test_late_evidence"]
    assert out[1].split() == ["idrm", "2", "62.5±17.7", "15", "5.0"]
    f = tmp_path / "r.json"
    f.write_text(json.dumps(runs))
    assert br.main(["--report", str(f), "--paired", "idrm,idrm"]) == 0


def test_teacher_mass_span_share_against_uniform() -> None:
    spec = importlib.util.spec_from_file_location("idrm_teacher_mass",
                                                  Path(__file__).parents[2] / "bench" / "idrm_teacher_mass.py")
    assert spec and spec.loader
    tm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tm)
    uniform = [0.1] * 10
    assert tm.span_share(uniform, (2, 4)) == pytest.approx((0.2, 1.0))  # no preference: ratio 1
    peaked = [0.0] * 10
    peaked[3] = 1.0
    assert tm.span_share(peaked, (2, 4)) == pytest.approx((1.0, 5.0))  # all mass on 2 of 10 chars: 5x uniform
    with pytest.raises(ValueError, match="outside"):
        tm.span_share(uniform, (8, 12))


@pytest.mark.parametrize(("method", "tau"), [("rrm_lora", 0.2), ("rrm_lora_u1", 0.0)])
def test_rrm_lora_arms_take_bt_loras_steps_start_and_placement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               method: str, tau: float) -> None:
    import rewardkit.training.rrm as rrm
    from rewardkit.training.config import IdRMConfig
    from rewardkit.training.loop import total_steps

    seen = []

    class _Result:
        metrics: dict = {}

    monkeypatch.setattr(rrm, "train_rrm", lambda cfg, command=None: seen.append((cfg, command)) or _Result())
    start = tmp_path / "bt-s3"
    start.mkdir()
    (start / "rewardkit.json").write_text("{}")  # the seed's frozen BT start exists: no BT training here
    args = type("A", (), {"out": str(tmp_path), "testbed": "data/testbed", "train_pairs": 300, "epochs": 30.0,
                          "cache": "", "tau": 0.2, "lora_pairs": 150, "lora_epochs": 2.0, "lora_lr": 5e-4,
                          "lora_layers": "all", "lora_targets": ""})()
    br.train(method, args, 3)
    cfg, cmd = seen[0]
    # the same optimiser steps as bt_lora's loop takes over its pairs (batch 8): ceil(150 / 8) * 2 = 38
    bt_lora = IdRMConfig(model=str(start), train_file="data/testbed", output_dir=str(tmp_path / "x"), batch_size=8,
                         num_epochs=2.0)
    assert cfg.max_steps == total_steps(bt_lora, 150) == 38
    assert (cfg.mode, cfg.model, cfg.baseline_model) == ("lora", str(start), str(start))
    assert (cfg.tau, cfg.augment_ratio, cfg.lora_layers, cfg.learning_rate) == (tau, 1.0, "all", 5e-4)
    assert cmd.startswith("rewardkit train rrm ") and "--max-steps 38" in cmd


def test_relevance_pairs_borrow_another_prompts_chosen_response() -> None:
    from rewardkit.training.data import PreferencePair

    pairs = [PreferencePair(prompt=f"q{i}", chosen=f"own {i}", rejected=f"bad {i}") for i in range(7)]
    rel = br.relevance_pairs(pairs)
    assert [r.prompt for r in rel] == [p.prompt for p in pairs]
    assert [r.chosen for r in rel] == [p.chosen for p in pairs]
    borrowed = [int(r.rejected.split()[1]) for r in rel]
    assert all(r.rejected.startswith("own ") for r in rel)  # a good answer, to another question
    assert all(j != i for i, j in enumerate(borrowed)) and len(set(borrowed)) > 1
    assert [r.rejected for r in br.relevance_pairs(pairs)] == [r.rejected for r in rel]  # seeded
