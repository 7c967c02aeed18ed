"""Fair share between runs (start-time fair queueing in the scheduler): a flooding run cannot starve another, weights
set the shares, and with one run the order is plain FIFO as before."""

from __future__ import annotations

import asyncio

from rewardkit.server.scheduler import Scheduler
from rewardkit.server.settings import Settings


def _order(submissions: list[tuple[str | None, int]], weight: dict[str, float] | None = None,
           batch: int = 1) -> list[str]:
    """Submit (run, n items) requests all at once, then run batches of ``batch`` items; the runs in service order."""
    served: list[str] = []

    def fn(xs: list[str]) -> list[str]:
        served.extend(xs)
        return xs

    async def main() -> None:
        s: Scheduler[str, str] = Scheduler(fn, max_batch_tokens=10_000, max_batch_size=batch, max_wait_s=0.0,
                                           max_queue_items=10_000,
                                           run_weight=(lambda r: (weight or {}).get(r or "", 1.0)))
        futs = []
        for k, (run, n) in enumerate(submissions):
            futs += s.submit([f"{run}:{k}:{i}" for i in range(n)], [10] * n, timeout_s=10, run=run)
        s.start()
        await asyncio.gather(*futs)
        await s.stop()

    asyncio.run(main())
    return served


def test_one_run_is_fifo() -> None:
    served = _order([(None, 3), (None, 2), (None, 4)])
    assert served == [f"None:{k}:{i}" for k, n in enumerate((3, 2, 4)) for i in range(n)]
    named = _order([("a", 3), ("a", 2)])
    assert named == [f"a:{k}:{i}" for k, n in enumerate((3, 2)) for i in range(n)]


def test_flooding_run_does_not_starve_another() -> None:
    served = _order([("big", 64), ("small", 4)])  # the big run's 64 items were queued first
    small = [i for i, x in enumerate(served) if x.startswith("small")]
    assert small == [1, 3, 5, 7], small  # alternating with the big run (tie at tag 0: the older first)
    fifo = _order([(None, 64), (None, 4)])  # unnamed: one run, arrival order, the small request last
    assert [i for i, x in enumerate(fifo) if x.startswith("None:1")] == [64, 65, 66, 67]


def test_weights_set_the_shares() -> None:
    served = _order([("a", 40), ("b", 40)], weight={"a": 3.0})
    first = served[:40]
    share_a = sum(x.startswith("a") for x in first) / 40
    assert 0.7 <= share_a <= 0.8, share_a  # 3:1 while both wait


def test_idle_run_gets_no_credit() -> None:
    """A run that was idle while another was served starts at the current virtual time, not at zero (it cannot
    bank its idle time and then hold the model)."""
    served: list[str] = []

    def fn(xs: list[str]) -> list[str]:
        served.extend(xs)
        return xs

    async def main() -> None:
        s: Scheduler[str, str] = Scheduler(fn, max_batch_tokens=10_000, max_batch_size=1, max_wait_s=0.0,
                                           max_queue_items=1000)
        s.start()
        await asyncio.gather(*s.submit([f"a{i}" for i in range(20)], [10] * 20, timeout_s=10, run="a"))
        futs = s.submit([f"a{i}" for i in range(20, 30)], [10] * 10, timeout_s=10, run="a")
        futs += s.submit([f"b{i}" for i in range(10)], [10] * 10, timeout_s=10, run="b")
        await asyncio.gather(*futs)
        await s.stop()

    asyncio.run(main())
    later = served[20:]
    assert sum(x.startswith("b") for x in later[:10]) == 5, later  # b shares from now on, no catch-up burst


def test_run_weight_setting() -> None:
    s = Settings(run_weights="team-a/=2,team-a/eval=0.5")  # type: ignore[arg-type]
    assert s.run_weight("team-a/x") == 2.0 and s.run_weight("team-a/eval-1") == 0.5
    assert s.run_weight("team-b") == 1.0 and s.run_weight(None) == 1.0
    assert Settings(run_weights='{"x": 3}').run_weight("xy") == 3.0  # type: ignore[arg-type]
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="weight is in"):
        Settings(run_weights="a=0")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="PREFIX=WEIGHT"):
        Settings(run_weights="abc")  # type: ignore[arg-type]


def test_run_bookkeeping_stays_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Run ids come from clients: after the runs are served and gone, the scheduler holds none of them, with the
    short-batch cap off too (the pruning does not depend on it)."""
    import rewardkit.server.scheduler as sched

    monkeypatch.setattr(sched, "ACTIVE_S", 0.0)
    for cap in (0, 4):
        async def main(cap: int = cap) -> Scheduler[str, str]:
            s: Scheduler[str, str] = Scheduler(lambda xs: xs, max_batch_tokens=10_000, max_batch_size=8,
                                               max_wait_s=0.0, max_queue_items=10_000, fair_batch_size=cap)
            s.start()
            for i in range(300):
                await asyncio.gather(*s.submit([f"x{i}"], [10], timeout_s=10, run=f"run-{i}"))
            await asyncio.gather(*s.submit(["last"], [10], timeout_s=10, run="last"))
            await s.stop()
            return s

        s = asyncio.run(main())
        assert len(s._seen) <= 2 and len(s._finish) <= 2, (cap, len(s._seen), len(s._finish))


def test_parts_keep_prefix_groups_together() -> None:
    from rewardkit.server.scheduler import Job, _parts

    def job(key: str | None) -> Job[str]:
        return Job(payload=str(key), num_tokens=10, future=None, enqueued=0.0, deadline=1.0, key=key)  # type: ignore[arg-type]

    batch = [job("g"), job(None), job("g"), job("h"), job("g"), job(None)]
    parts = _parts(batch, 2)
    for key in ("g", "h"):
        assert sum(any(j.key == key for j in p) for p in parts) == 1, (key, [[j.key for j in p] for p in parts])
    assert sorted(id(j) for p in parts for j in p) == sorted(id(j) for j in batch)  # nothing lost or doubled
    assert [len(p) for p in _parts([job(None) for _ in range(5)], 2)] == [2, 2, 1]


def test_run_that_shows_up_waits_one_part_not_the_batch() -> None:
    """One run alone fills a 16-item batch; a second run's item submitted during the first part is served right
    after it (the rest of the batch goes back to the queue with its tags), and every item is still answered once."""
    import time

    calls: list[list[str]] = []

    def fn(xs: list[str]) -> list[str]:
        calls.append(list(xs))
        time.sleep(0.05)
        return [x.upper() for x in xs]

    async def main(preemptible: bool, big_run: str | None) -> list[str]:
        s: Scheduler[str, str] = Scheduler(fn, max_batch_tokens=10_000, max_batch_size=16, max_wait_s=0.0,
                                           max_queue_items=1000, fair_batch_size=2, preemptible=preemptible)
        big = s.submit([f"a{i}" for i in range(16)], [10] * 16, timeout_s=10, run=big_run)
        s.start()
        await asyncio.sleep(0.02)  # the first part is running
        small = s.submit(["b0"], [10], timeout_s=10, run="b")
        out = await asyncio.gather(*big, *small)
        await s.stop()
        return out

    for preemptible, big_run in ((True, "a"), (False, "a"), (True, None)):  # unnamed traffic keeps whole batches
        calls.clear()
        out = asyncio.run(main(preemptible, big_run))
        assert out == [f"A{i}" for i in range(16)] + ["B0"]
        served = [x for c in calls for x in c]
        assert sorted(served) == sorted([f"a{i}" for i in range(16)] + ["b0"])  # each item once
        before_b = served.index("b0")
        if preemptible and big_run is not None:
            assert before_b <= 2 + 2, calls  # the part that was running, then at most one more
        else:
            assert before_b == 16, calls  # the whole batch first
