"""Fair share between runs over HTTP (issue 24): one run floods a shared server at 64 requests in flight while a
small run keeps 4 in flight. The small run's p99 against its p99 alone, with runs named (the scheduler's fair
queueing) and, as the baseline in the same run, with the same traffic unnamed (one FIFO queue, as before).

    .venv/bin/python bench/bench_fairness.py                    # tiny model and SmolLM2 (~6 min)
    .venv/bin/python bench/bench_fairness.py --models tiny      # ~1 min

Each request is one item on ``POST /v1/rewards`` with the run in ``x-rewardkit-run`` (as the client sends it). The
flood runs until the small run's requests are all answered; with ``--flood-process`` it is sent from its own client
process, as another trainer would send it (on 2 cores that process is then short of CPU and floods less). Phases, on one server process: small alone; small +
flood with both runs named (fair); small + flood unnamed (FIFO). Each phase is repeated ``--repeats`` times,
interleaved, and the medians are reported. Writes bench/results/fairness.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, WORDS, python, start_process, stop_process, write_json  # noqa: E402


def texts(n: int, words: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"Answer {seed}-{i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(n)]


async def _flood(client: httpx.AsyncClient, url: str, flood: list[str], named: bool, conc: int,
                 stopped: Callable[[], bool], answered: Callable[[], None]) -> None:
    """The flooding run: ``conc`` single-item requests in flight until ``stopped()``."""

    async def worker(k: int) -> None:
        i = k
        while not stopped():
            t = flood[i % len(flood)]
            i += conc
            r = await client.post(url + "/v1/rewards", json={"items": [{"text": t}]},
                                  headers={"x-rewardkit-run": "flood-run"} if named else {})
            r.raise_for_status()
            answered()

    await asyncio.gather(*(worker(k) for k in range(conc)))


def _flood_process(url: str, flood: list[str], named: bool, conc: int, stop: Any, count: Any) -> None:
    """The flood from its own process (another trainer), until ``stop`` is set; ``count`` counts its answers."""

    def answered() -> None:
        with count.get_lock():
            count.value += 1

    async def main() -> None:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=conc + 4)) as client:
            await _flood(client, url, flood, named, conc, stop.is_set, answered)

    asyncio.run(main())


async def run_load(url: str, small: list[str], flood: list[str] | None, named: bool, small_conc: int,
                   flood_conc: int, flood_process: bool = False) -> dict[str, Any]:
    """Send ``small`` at ``small_conc`` in flight, and ``flood`` at ``flood_conc`` until the small run is done:
    from this process, or with ``flood_process`` from its own (two trainers: the small run's latency then does not
    include the flood's client-side work). The flood's throughput counts its answers while the small run runs."""
    import multiprocessing as mp

    lat: list[float] = []
    done = asyncio.Event()
    local = [0]
    ctx = mp.get_context("spawn")
    stop, count = ctx.Event(), ctx.Value("l", 0)

    def answered() -> None:
        local[0] += 1

    def flood_answers() -> int:
        return int(count.value) if flood_process else local[0]

    async def small_worker(client: httpx.AsyncClient, queue: list[str]) -> None:
        while queue:
            t = queue.pop()
            t0 = time.perf_counter()
            r = await client.post(url + "/v1/rewards", json={"items": [{"text": t}]},
                                  headers={"x-rewardkit-run": "small-run"} if named else {})
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=small_conc + flood_conc + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        proc, task = None, None
        if flood and flood_process:
            proc = ctx.Process(target=_flood_process, args=(url, flood, named, flood_conc, stop, count), daemon=True)
            proc.start()
        elif flood:
            task = asyncio.create_task(_flood(client, url, flood, named, flood_conc, done.is_set, answered))
        if flood:
            await asyncio.sleep(3.0 if flood_process else 1.0)  # the flood's queue is full before the small run
        queue = list(small)
        n0 = flood_answers()
        t0 = time.perf_counter()
        await asyncio.gather(*(small_worker(client, queue) for _ in range(small_conc)))
        wall = time.perf_counter() - t0
        flood_n = flood_answers() - n0
        done.set()
        stop.set()
        if task is not None:
            await task
        if proc is not None:
            proc.join(120)
    lat.sort()
    return {"small_p50_ms": 1000 * statistics.median(lat), "small_p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "small_requests": len(lat), "small_wall_s": wall, "flood_requests": flood_n,
            "flood_rps": flood_n / wall if flood else 0.0}


def bench_model(name: str, model: str | None, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = 8790
    url = f"http://127.0.0.1:{port}"
    margs = [] if model is None else ["--model", model]
    proc = start_process([python(), "-m", "rewardkit.cli", "serve", *margs, "--port", str(port),
                          "--max-batch-size", str(a.max_batch_size)], url, tmp / f"{name}.log",
                         env_extra={"REWARDKIT_R2M_ENABLED": "false"})
    n_small = a.small_requests if name == "tiny" else a.small_requests // 4
    words = 24
    phases: dict[str, list[dict[str, Any]]] = {"solo": [], "fair": [], "fifo": []}
    try:
        asyncio.run(run_load(url, texts(16, words, 999), None, True, a.small_conc, a.flood_conc))  # warm-up
        for rep in range(a.repeats):
            for k, phase in enumerate(("solo", "fair", "fifo")):
                if phase not in a.phases.split(","):
                    continue
                small = texts(n_small, words, seed=100 * rep + k)  # fresh texts per phase (no cache hits)
                flood = None if phase == "solo" else texts(4000, words, seed=7 + rep)
                res = asyncio.run(run_load(url, small, flood, phase != "fifo", a.small_conc, a.flood_conc,
                                           a.flood_process))
                phases[phase].append(res)
                print(f"{name:8s} rep {rep} {phase:5s} small p50 {res['small_p50_ms']:8.1f} ms  "
                      f"p99 {res['small_p99_ms']:8.1f} ms  flood {res['flood_rps']:6.1f} req/s", flush=True)
    finally:
        stop_process(proc)

    def med(phase: str, key: str) -> float:
        return statistics.median(r[key] for r in phases[phase]) if phases[phase] else float("nan")

    solo = med("solo", "small_p99_ms")
    out = {"model": name, "small_requests": n_small, "small_concurrency": a.small_conc,
           "flood_concurrency": a.flood_conc, "max_batch_size": a.max_batch_size, "repeats": a.repeats,
           "solo_p99_ms": solo, "fair_p99_ms": med("fair", "small_p99_ms"), "fifo_p99_ms": med("fifo", "small_p99_ms"),
           "fair_over_solo": med("fair", "small_p99_ms") / solo, "fifo_over_solo": med("fifo", "small_p99_ms") / solo,
           "fair_flood_rps": med("fair", "flood_rps"), "fifo_flood_rps": med("fifo", "flood_rps"), "phases": phases}
    print(f"{name}: small run p99 solo {solo:.1f} ms; with a 64-in-flight flood: fair {out['fair_p99_ms']:.1f} ms "
          f"({out['fair_over_solo']:.2f}x solo), unnamed FIFO {out['fifo_p99_ms']:.1f} ms "
          f"({out['fifo_over_solo']:.2f}x); flood {out['fair_flood_rps']:.1f} vs {out['fifo_flood_rps']:.1f} req/s",
          flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--small-requests", type=int, default=400, help="small run's requests per phase (SmolLM2: /4)")
    ap.add_argument("--small-conc", type=int, default=4)
    ap.add_argument("--flood-conc", type=int, default=64)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phases", default="solo,fair,fifo", help="which phases to run (solo is needed for ratios)")
    ap.add_argument("--flood-process", action="store_true",
                    help="send the flood from its own client process (two trainers) instead of the small run's")
    ap.add_argument("--json", default=str(ROOT / "bench/results/fairness.json"))
    a = ap.parse_args()
    from rewardkit.core.testing import make_tiny_reward_model

    tmp = Path(tempfile.mkdtemp(prefix="rk-fair-"))
    models = {"tiny": str(make_tiny_reward_model(tmp / "tiny", arch="llama", hidden=64, layers=2)), "smollm2": None}
    results = []
    for name in a.models.split(","):
        results.append(bench_model(name, models[name], a, tmp))
        write_json(Path(a.json), {"results": results, "args": vars(a)})
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
