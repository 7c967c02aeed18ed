"""The dynamic batcher: budget, ordering, failure isolation, deadlines, backpressure."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from rewardkit.server.scheduler import BatchStats, DeadlineExceeded, QueueFull, Scheduler, select_batch


def test_select_batch_respects_budget_and_includes_oldest() -> None:
    lengths = [10, 500, 12, 11, 490, 9, 13]
    ages = [5.0, 0.0, 1.0, 2.0, 3.0, 4.0, 6.0]  # item 1 (len 500) is the oldest
    idx = select_batch(lengths, ages, max_tokens=1000, max_size=8)
    assert 1 in idx and set(idx) == {1, 4}  # the long ones together: 2 * 500 <= 1000
    idx = select_batch(lengths, [0.0, 9, 1, 2, 9, 3, 4], max_tokens=1000, max_size=8)
    assert 0 in idx and all(lengths[i] < 20 for i in idx) and len(idx) == 5
    assert select_batch(lengths, ages, max_tokens=100, max_size=2) == [1]  # an item alone always fits


def test_select_batch_keeps_padding_low() -> None:
    import random

    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(200)]
    ages = [float(i) for i in range(200)]
    idx = select_batch(lengths, ages, max_tokens=4096, max_size=64)
    width = max(lengths[i] for i in idx)
    padding = 1 - sum(lengths[i] for i in idx) / (width * len(idx))
    fifo = lengths[: len(idx)]  # arrival order, same batch size
    fifo_padding = 1 - sum(fifo) / (max(fifo) * len(fifo))
    assert padding < 0.15 and padding < fifo_padding / 3, (padding, fifo_padding)


def _run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_results_routed_in_order_across_requests() -> None:
    seen_batches: list[list[int]] = []

    def fn(xs: list[int]) -> list[int]:
        seen_batches.append(list(xs))
        return [x * 10 for x in xs]

    async def main() -> None:
        s: Scheduler[int, int] = Scheduler(fn, max_batch_tokens=1000, max_batch_size=8, max_wait_s=0.05,
                                           max_queue_items=100)
        s.start()
        a = s.submit([1, 2, 3], [5, 50, 5], timeout_s=10)
        b = s.submit([4, 5], [5, 50], timeout_s=10)
        assert await asyncio.gather(*a) == [10, 20, 30]
        assert await asyncio.gather(*b) == [40, 50]
        await s.stop()

    _run(main())
    assert len(seen_batches) == 1  # items of two requests shared one batch
    assert seen_batches[0] == sorted(seen_batches[0], key=lambda x: {1: 5, 2: 50, 3: 5, 4: 5, 5: 50}[x])


def test_failing_item_fails_only_its_request() -> None:
    def fn(xs: list[int]) -> list[int]:
        if 13 in xs:
            raise RuntimeError("bad item 13")
        return [x + 1 for x in xs]

    async def main() -> None:
        s: Scheduler[int, int] = Scheduler(fn, max_batch_tokens=1000, max_batch_size=8, max_wait_s=0.02,
                                           max_queue_items=100)
        s.start()
        good = s.submit([1, 2], [3, 3], timeout_s=10)
        bad = s.submit([13], [3], timeout_s=10)
        assert await asyncio.gather(*good) == [2, 3]
        with pytest.raises(RuntimeError, match="bad item 13"):
            await bad[0]
        assert await s.submit([7], [3], timeout_s=10)[0] == 8  # the worker still serves
        await s.stop()

    _run(main())


def test_queue_bound_deadline_and_cancellation() -> None:
    gate = threading.Event()
    ran: list[int] = []
    stats: list[BatchStats] = []

    def fn(xs: list[int]) -> list[int]:
        gate.wait(5)
        ran.extend(xs)
        return xs

    async def main() -> None:
        s: Scheduler[int, int] = Scheduler(fn, max_batch_tokens=100, max_batch_size=1, max_wait_s=0.0,
                                           max_queue_items=3, on_batch=stats.append)
        s.start()
        first = s.submit([1], [1], timeout_s=10)
        await asyncio.sleep(0.05)  # 1 is now running and blocked on the gate
        expired = s.submit([2], [1], timeout_s=0.01)
        cancelled = s.submit([3], [1], timeout_s=10)
        kept = s.submit([4], [1], timeout_s=10)
        with pytest.raises(QueueFull):
            s.submit([5], [1], timeout_s=10)  # 3 queued = max_queue_items: refused whole
        cancelled[0].cancel()
        time.sleep(0.05)
        gate.set()
        assert await first[0] == 1 and await kept[0] == 4
        with pytest.raises(DeadlineExceeded):
            await expired[0]
        await s.stop()

    _run(main())
    assert ran == [1, 4]  # neither the expired nor the cancelled item reached the model
    assert stats and stats[0].size == 1 and stats[0].padded_tokens >= stats[0].tokens


def test_stop_drains_in_flight() -> None:
    def fn(xs: list[int]) -> list[int]:
        time.sleep(0.1)
        return xs

    async def main() -> None:
        s: Scheduler[int, int] = Scheduler(fn, max_batch_tokens=100, max_batch_size=2, max_wait_s=0.0,
                                           max_queue_items=100)
        s.start()
        futs = s.submit([1, 2, 3, 4, 5], [1] * 5, timeout_s=10)
        await asyncio.sleep(0.01)
        await s.stop(drain_timeout=10)
        assert [f.result() for f in futs] == [1, 2, 3, 4, 5]
        with pytest.raises(QueueFull):
            s.submit([6], [1], timeout_s=1)

    _run(main())
