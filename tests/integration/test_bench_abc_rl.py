"""bench/bench_abc_rl.py --quick end to end: a BT-trained reward model served by a real server process, a policy
trained against it over HTTP in every arm, the results file in the documented shape, and the faithfulness probe
passing its own sanity checks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_quick_mode_runs_every_arm_and_writes_the_documented_results(tmp_path: Path) -> None:
    out = tmp_path / "abc_rl.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_abc_rl.py"), "--quick", "--out", str(out),
                        "--plot", str(tmp_path / "curves.png")], capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert data["partial"] is False
    runs = data["runs"]
    assert {r["arm"] for r in runs} == {"sparse", "abc_0.8", "abc_1.0", "uniform", "shuffled", "oracle",
                                        "gold_sparse"}
    for r in runs:
        assert r["length"] == 16 and r["steps"] == len(r["curve"]) == 60
        assert r["steps_to_80"] is None or 1 <= r["steps_to_80"] <= r["steps"]
        assert 0 < r["auc"] <= 1.0 + 1e-9 and 0 <= r["final_gold"] <= 1
        assert all(0 <= g <= 1 for g in r["curve"])
    by_arm = {r["arm"]: r for r in runs}
    # sanity: the policy learns from the gold itself (the task is learnable in 60 steps), dense or sparse
    for arm in ("oracle", "gold_sparse"):
        assert by_arm[arm]["final_gold"] > 1.5 * by_arm[arm]["curve"][0], arm
    assert data["reward_model"]["held_out_accuracy"] > 0.6  # the RM learnt the task beyond chance
    f = data["faithfulness"]["task_rm"]
    assert abs(f["random_weights"]) < 0.2  # control: random weights do not correlate with occlusion
    assert -1 <= f["spearman"] <= 1 and f["items"] == 20
    # the attention step ran (3 rounds by default) and the BT model's faithfulness is kept as the control
    steps = data["reward_model"]["attention_step"]
    assert len(steps) == 3 and all(st["kl_last"] > 0 and st["target"] == "occlusion" for st in steps)
    assert -1 <= f["bt_before_attention_step"]["spearman"] <= 1
