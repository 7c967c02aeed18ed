"""The short soak (bench/bench_soak.py --short) against the real server process: concurrent RL-shaped traffic with
some abandoned requests for ~30 s on the tiny model. Zero errors other than 429, bounded memory growth, and the
prompt KV cache's bytes (scraped from /metrics) within its budget while it evicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAX_RSS_GROWTH_MB = 64  # after warm-up, over ~25 s; a leak of one request's worth per request would be far more
KV_CACHE_MB = 1  # small, so the prompt KV cache fills its budget and must evict to stay under it


def test_short_soak_has_no_errors_and_flat_memory(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_soak.py"), "--short", "--clients", "8",
                           "--minutes", "0.33", "--warmup-s", "5", "--abandon", "0.05", "--out", str(out),
                           f"--server-arg=--prefix-cache-mb={KV_CACHE_MB}"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.exists(), proc.stdout[-2000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["non_429_errors"] == 0, res["errors"]
    assert res["requests_served"] >= 50, res
    assert res["server_log_errors"] == 0, res
    assert res["rss_growth_after_warmup_mb"] < MAX_RSS_GROWTH_MB + KV_CACHE_MB, res
    # the KV cache's bytes, scraped from /metrics through the soak, never exceed the budget, which it did reach
    assert res["kv_samples"] >= 5 and res["kv_limit_bytes"] == KV_CACHE_MB * 2**20, res
    assert res["kv_within_limit"] is True and res["kv_bytes_max"] <= res["kv_limit_bytes"], res
    assert res["kv_stores"] > 0 and res["kv_evictions"] > 0, res
    assert res["kv_bytes_max"] > res["kv_limit_bytes"] // 2, res
    assert proc.returncode == 0, proc.stdout[-2000:]
