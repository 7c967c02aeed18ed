"""Soak and load: N concurrent clients for M minutes against the real server process.

Reports requests served, errors by type (goal: zero errors other than 429), p50/p99 latency, the server process's
resident memory (RSS) after warm-up and at the end (goal: flat after warm-up), and the prompt KV cache's bytes
scraped from ``/metrics`` every 2 s (goal: never above ``--prefix-cache-mb``), with its hits, stores and evictions.
The mix is what RL trainers send: GRPO groups on ``/v1/rewards`` (one prompt, K completions), single texts on
``/get_reward`` (OpenRLHF) and ``/pooling`` (vLLM/verl), plus a small share of requests the client abandons
mid-flight (a trainer that timed out), which exercises the disconnect path. A 429 is honoured (sleep
``Retry-After``) and counted apart.

    python bench/bench_soak.py                       # default model, 16 clients, 10 minutes
    python bench/bench_soak.py --clients 8 --minutes 3
    python bench/bench_soak.py --short               # tiny random model, ~30 s: what CI runs
    python bench/bench_soak.py --url http://host:8000 --pid 1234   # an already running server
    python bench/bench_soak.py --server-arg=--prefix-cache-mb=8    # a small KV budget: evictions, bytes checked

Writes JSON to ``--out`` (default ``bench/results/soak.json``, ``soak_short.json`` with ``--short``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (  # noqa: E402
    ROOT,
    WORDS,
    parse_kv_metrics,
    python,
    start_process,
    stop_process,
    write_json,
)


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def make_request(rng: random.Random, scale: int) -> tuple[str, dict[str, Any]]:
    """One request of the RL mix: (path, JSON body). ``scale`` multiplies text lengths (words)."""
    kind = rng.random()
    if kind < 0.5:  # GRPO group: one prompt, K completions
        prompt = _sentence(rng, 5 * scale, 25 * scale) + "?"
        k = rng.choice((2, 4, 8))
        return "/v1/rewards", {"items": [{"prompt": prompt, "response": _sentence(rng, 1, 15 * scale)}
                                         for _ in range(k)]}
    if kind < 0.8:
        return "/get_reward", {"query": [_sentence(rng, 5 * scale, 40 * scale)]}
    return "/pooling", {"input": [_sentence(rng, 5 * scale, 30 * scale)]}


class Stats:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.served = 0
        self.items = 0
        self.throttled = 0
        self.abandoned = 0


async def client_loop(url: str, headers: dict[str, str], stop_at: float, stats: Stats, seed: int, scale: int,
                      abandon: float) -> None:
    rng = random.Random(seed)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=10), headers=headers) as client:
        while time.monotonic() < stop_at:
            path, body = make_request(rng, scale)
            t0 = time.perf_counter()
            try:
                if rng.random() < abandon:  # give up after a few ms: the server must drop it, not leak it
                    try:
                        await asyncio.wait_for(client.post(url + path, json=body), timeout=rng.uniform(0.001, 0.02))
                    except TimeoutError:
                        stats.abandoned += 1
                        continue
                    r = None
                else:
                    r = await client.post(url + path, json=body)
            except httpx.HTTPError as exc:
                stats.errors[type(exc).__name__] += 1
                continue
            if r is None:  # an "abandoned" request that finished in time
                stats.served += 1
                continue
            if r.status_code == 200:
                stats.latencies.append(time.perf_counter() - t0)
                stats.served += 1
                stats.items += len(body.get("items", body.get("query", body.get("input", []))))
            elif r.status_code == 429:
                stats.throttled += 1
                await asyncio.sleep(float(r.headers.get("Retry-After", "1")))
            else:
                try:
                    etype = r.json()["error"]["type"]
                except (ValueError, KeyError, TypeError):
                    etype = "?"
                stats.errors[f"http_{r.status_code}_{etype}"] += 1


async def sample_rss(pid: int, stop_at: float, out: list[tuple[float, int]], t_start: float,
                     every: float = 1.0) -> None:
    while time.monotonic() < stop_at:
        out.append((time.monotonic() - t_start, rss_bytes(pid)))
        await asyncio.sleep(every)
    out.append((time.monotonic() - t_start, rss_bytes(pid)))




async def sample_kv(url: str, headers: dict[str, str], stop_at: float, out: list[dict[str, float]],
                    every: float = 2.0) -> None:
    """Scrape ``/metrics`` every ``every`` s for the prompt KV cache's bytes, entries and counters."""
    async with httpx.AsyncClient(timeout=10, headers=headers) as client:
        while True:
            try:
                r = await client.get(url + "/metrics")
                if r.status_code == 200:
                    out.append(parse_kv_metrics(r.text))
            except httpx.HTTPError:
                pass
            if time.monotonic() >= stop_at:
                return
            await asyncio.sleep(every)


def kv_summary(samples: list[dict[str, float]], limit_mb: float | None) -> dict[str, Any]:
    """What the soak saw of the KV cache: the most bytes held against the configured budget, and its counters."""
    held = [s["bytes"] for s in samples if "bytes" in s]
    if not held:
        return {}
    last = samples[-1]
    hits, misses = last.get("hits_total", 0.0), last.get("misses_total", 0.0)
    res: dict[str, Any] = {
        "kv_samples": len(held), "kv_bytes_max": int(max(held)), "kv_bytes_end": int(held[-1]),
        "kv_entries_max": int(max(s.get("entries", 0.0) for s in samples)),
        **{f"kv_{k}": int(last.get(f"{k}_total", 0.0)) for k in ("hits", "misses", "stores", "evictions",
                                                                 "tokens_saved")},
        "kv_hit_rate": round(hits / (hits + misses), 3) if hits + misses else None,
    }
    if limit_mb is not None:
        res["kv_limit_bytes"] = int(limit_mb * 2**20)
        res["kv_within_limit"] = res["kv_bytes_max"] <= res["kv_limit_bytes"]
    return res


def _slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    if len(samples) < 3:
        return 0.0
    xs = [t for t, _ in samples]
    ys = [b / 2**20 for _, b in samples]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 60 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


async def soak(url: str, pid: int | None, clients: int, seconds: float, warmup: float, scale: int, abandon: float,
               api_key: str | None, kv_limit_mb: float | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    stats = Stats()
    t_start = time.monotonic()
    stop_at = t_start + warmup + seconds
    samples: list[tuple[float, int]] = []
    tasks = [client_loop(url, headers, stop_at, stats, seed, scale, abandon) for seed in range(clients)]
    if pid is not None:
        tasks.append(sample_rss(pid, stop_at, samples, t_start))
    kv: list[dict[str, float]] = []
    tasks.append(sample_kv(url, headers, stop_at, kv))
    await asyncio.gather(*tasks)
    wall = time.monotonic() - t_start
    lat = sorted(stats.latencies)
    after = [(t, b) for t, b in samples if t >= warmup]
    res: dict[str, Any] = {
        "clients": clients, "seconds": round(wall, 1), "warmup_s": warmup,
        "requests_served": stats.served, "items_scored": stats.items,
        "requests_per_s": round(stats.served / wall, 1),
        "throttled_429": stats.throttled, "abandoned_by_client": stats.abandoned,
        "errors": dict(stats.errors), "non_429_errors": sum(stats.errors.values()),
        "p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
    }
    if after:
        res.update({
            "rss_start_mb": round(samples[0][1] / 2**20, 1),
            "rss_after_warmup_mb": round(after[0][1] / 2**20, 1),
            "rss_end_mb": round(after[-1][1] / 2**20, 1),
            "rss_max_mb": round(max(b for _, b in after) / 2**20, 1),
            "rss_growth_after_warmup_mb": round((after[-1][1] - after[0][1]) / 2**20, 1),
            "rss_slope_mb_per_min": round(_slope_mb_per_min(after), 2),
        })
    res.update(kv_summary(kv, kv_limit_mb))
    return res


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model to serve (default: the embedded default model; --short: a tiny one)")
    ap.add_argument("--clients", type=int, help="concurrent clients (default 16; --short 8)")
    ap.add_argument("--minutes", type=float, help="measured duration after warm-up (default 10; --short 0.5)")
    ap.add_argument("--warmup-s", type=float, help="warm-up before RSS is baselined (default 60; --short 8)")
    ap.add_argument("--scale", type=int, default=1, help="text length multiplier (words)")
    ap.add_argument("--abandon", type=float, default=0.02, help="share of requests the client abandons mid-flight")
    ap.add_argument("--short", action="store_true", help="tiny random model, ~40 s in all (CI)")
    ap.add_argument("--url", help="soak an already running server instead of starting one")
    ap.add_argument("--pid", type=int, help="with --url: the server's pid, for RSS")
    ap.add_argument("--api-key", help="bearer key for --url")
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for `rewardkit serve` (repeatable)")
    ap.add_argument("--kv-limit-mb", type=float,
                    help="the server's prompt KV budget, to check the scraped bytes against (default: read from "
                         "--server-arg=--prefix-cache-mb=N when given)")
    ap.add_argument("--out", type=Path, help="JSON output path")
    args = ap.parse_args(argv)
    kv_limit = args.kv_limit_mb
    for a in args.server_arg:
        if kv_limit is None and a.startswith("--prefix-cache-mb="):
            kv_limit = float(a.split("=", 1)[1])
    clients = args.clients or (8 if args.short else 16)
    seconds = 60 * (args.minutes if args.minutes is not None else (0.5 if args.short else 10))
    warmup = args.warmup_s if args.warmup_s is not None else (8 if args.short else 60)
    out = args.out or ROOT / "bench" / "results" / ("soak_short.json" if args.short else "soak.json")

    proc = None
    url, pid, model = args.url, args.pid, args.model
    with tempfile.TemporaryDirectory() as tmp:
        if url is None:
            if args.short and model is None:
                from rewardkit.core.testing import make_tiny_reward_model

                model = str(make_tiny_reward_model(Path(tmp) / "tiny", arch="llama"))
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [python(), "-m", "rewardkit.cli", "serve", "--port", str(port), "--state-dir", str(Path(tmp) / "state"),
                   *(["--model", model] if model else []), *args.server_arg]
            proc = start_process(cmd, url, Path(tmp) / "server.log", timeout=600)
            pid = proc.pid
        try:
            res = asyncio.run(soak(url, pid, clients, seconds, warmup, args.scale, args.abandon, args.api_key,
                                   kv_limit))
        finally:
            if proc is not None:
                stop_process(proc)
                res_rc = proc.returncode
        res.update({"model": model or "default", "short": args.short, "url_given": args.url is not None})
        if proc is not None:
            res["server_exit_code"] = res_rc
            log = (Path(tmp) / "server.log").read_text(errors="replace")
            res["server_log_errors"] = sum(1 for line in log.splitlines() if " ERROR " in line or "Traceback" in line)
    write_json(out, res)
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {json.dumps(v)}")
    print(f"wrote {out}")
    return 0 if res["non_429_errors"] == 0 and res.get("kv_within_limit", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
