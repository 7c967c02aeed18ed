"""bench/gpu.sh runs unchanged on a GPU machine; here its --smoke mode runs the same pipeline (peak, random bf16
Llama build, parity, both servers under load) on the tiny shape on CPU, so the script cannot rot unseen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_gpu_script_smoke_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {**os.environ, "PYTHON": sys.executable}
    p = subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--smoke", "--json", str(out)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    smoke = res["shapes"]["smoke"]
    assert res["bf16_matmul_peak_tflops"] > 0
    assert {r["server"] for r in smoke["rows"]} == {"naive (serve_rm-like)", "rewardkit"}
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] for r in smoke["rows"])
    # bf16 parity: a wrong read position or mask moves a reward by far more than bf16 rounding
    assert max(smoke["parity"][k] for k in ("batched", "prefix_shared", "kv_cache")) < 0.1 * smoke["parity"][
        "reward_scale"] + 0.05
