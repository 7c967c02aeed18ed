"""Series read at scrape time from the app state (Redis health, head swaps): the serving path pays nothing for them.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rewardkit.server.deps import AppState
from rewardkit.server.state import RedisState


class OperationsCollector(Collector):
    """Series read at scrape time from the app state: Redis health and head swaps seen by this replica."""

    def __init__(self, state: AppState) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        rs: RedisState | None = self.state.redis
        up = GaugeMetricFamily("rewardkit_redis_up", "1 when Redis answers; 0 when down (cache bypassed).")
        up.add_metric([], 1.0 if rs is not None and rs.available else 0.0)
        yield up
        rec = CounterMetricFamily("rewardkit_redis_reconnects", "Reconnections to Redis after an outage.")
        rec.add_metric([], float(rs.reconnects if rs is not None else 0))
        yield rec
        fail = CounterMetricFamily("rewardkit_redis_failures", "Redis outages detected (operation failed).")
        fail.add_metric([], float(rs.failures if rs is not None else 0))
        yield fail
        swaps = CounterMetricFamily("rewardkit_head_swaps", "Heads installed from another replica via Redis.")
        swaps.add_metric([], float(self.state.head_swaps))
        yield swaps
