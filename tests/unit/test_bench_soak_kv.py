"""bench/bench_soak.py's KV-cache check: the scraped gauge and counters parsed from a real metrics exposition, and
the summary's within-limit verdict on both sides of the budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parents[2]
_spec = importlib.util.spec_from_file_location("bench_soak", ROOT / "bench" / "bench_soak.py")
assert _spec and _spec.loader
bs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bs)


def _exposition(nbytes: int, hits: int, misses: int, evictions: int) -> str:
    """The real server's metrics registry, set to these values, rendered as /metrics renders it."""
    from prometheus_client import CollectorRegistry, generate_latest

    from rewardkit.server.metrics import Metrics

    m = Metrics(CollectorRegistry())
    m.kv_cache_bytes.set(nbytes)
    m.kv_cache_entries.set(3)
    m.kv_cache_counters["hits"].inc(hits)
    m.kv_cache_counters["misses"].inc(misses)
    m.kv_cache_counters["evictions"].inc(evictions)
    return generate_latest(m.registry).decode()


def test_parse_reads_the_gauge_and_counters_of_the_server_registry() -> None:
    kv = bs.parse_kv_metrics(_exposition(4096, 3, 1, 2))
    assert kv["bytes"] == 4096 and kv["entries"] == 3
    assert kv["hits_total"] == 3 and kv["misses_total"] == 1 and kv["evictions_total"] == 2


def test_summary_flags_bytes_above_the_budget() -> None:
    samples = [bs.parse_kv_metrics(_exposition(n, 3, 1, 0)) for n in (100, 2**20, 512)]
    ok = bs.kv_summary(samples, 1.0)
    assert ok["kv_bytes_max"] == 2**20 and ok["kv_bytes_end"] == 512 and ok["kv_within_limit"] is True
    assert ok["kv_hit_rate"] == 0.75 and ok["kv_samples"] == 3
    over = bs.kv_summary(samples + [bs.parse_kv_metrics(_exposition(2**20 + 1, 3, 1, 0))], 1.0)
    assert over["kv_within_limit"] is False
    assert "kv_within_limit" not in bs.kv_summary(samples, None)
    assert bs.kv_summary([], 1.0) == {}
