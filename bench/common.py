"""Shared pieces of the benchmarks: the matmul peak, GRPO-shaped workloads, server processes, load generation."""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the model reads each answer and checks whether the number matches the question asked by the user while "
         "a careful reviewer weighs evidence from several sources before writing a short clear reply about it").split()


def matmul_peak_gflops(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
    """Best-of-N GFLOP/s of an n x n matmul in the serving dtype (the machine's practical peak)."""
    import torch

    dt = getattr(torch, dtype)
    a = torch.randn(n, n, dtype=dt)
    b = torch.randn(n, n, dtype=dt)
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def grpo_workload(n_prompts: int, k: int, prompt_words: tuple[int, int], completion_words: tuple[int, int],
                  seed: int = 0) -> list[tuple[str, str]]:
    """P prompts x K completions, mixed lengths: list of (prompt, completion)."""
    rng = random.Random(seed)
    out = []
    for p in range(n_prompts):
        prompt = f"Question {p}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(*prompt_words))) + "?"
        for _ in range(k):
            out.append((prompt, " ".join(rng.choice(WORDS) for _ in range(rng.randint(*completion_words))) + "."))
    return out


def start_process(cmd: list[str], url: str, log: Path, timeout: float = 300,
                  env_extra: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env_extra or {})}
    fh = open(log, "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise TimeoutError(f"{cmd} not ready")


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def python() -> str:
    return sys.executable


async def drive(url: str, texts: list[str], concurrency: int, path: str = "/get_reward",
                prompts: list[str] | None = None) -> dict[str, Any]:
    """C concurrent clients, each sending single-item requests (as OpenRLHF's executor does). ``prompts``: each
    query's prompt part, sent as OpenRLHF's ``prompts`` field."""
    queue: asyncio.Queue[dict[str, list[str]]] = asyncio.Queue()
    for i, t in enumerate(texts):
        queue.put_nowait(openrlhf_body(t, None if prompts is None else prompts[i]))
    lat: list[float] = []

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                body = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            t0 = time.perf_counter()
            r = await client.post(url + path, json=body)
            r.raise_for_status()
            lat.append(time.perf_counter() - t0)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"wall_s": wall, "requests": len(lat), "p50_s": statistics.median(lat),
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


KV_METRICS = "rewardkit_prefix_kv_cache"


def parse_kv_metrics(text: str) -> dict[str, float]:
    """The prompt KV cache's gauge and counters from a Prometheus text exposition, keyed by the name after
    ``rewardkit_prefix_kv_cache_`` (``bytes``, ``hits_total``, ...; ``{}`` where it has none)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {smp.name[len(KV_METRICS) + 1:]: smp.value for fam in text_string_to_metric_families(text)
            if fam.name.startswith(KV_METRICS + "_") for smp in fam.samples if not smp.labels}


def openrlhf_body(query: str, prompt: str | None = None) -> dict[str, list[str]]:
    """One single-item ``/get_reward`` body as OpenRLHF sends it: ``query`` (prompt and response), ``prompts``."""
    return {"query": [query]} if prompt is None else {"query": [query], "prompts": [prompt]}


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2))


def merge_json(path: Path, key: str, value: Any) -> None:
    """Set one part of a results file, keeping the parts other scripts wrote (r2m_policy.json: premise, offline,
    online, isolation)."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[key] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))


WRK_LUA = r"""
local bodies = {}
for line in io.lines(os.getenv("RK_BODIES")) do bodies[#bodies + 1] = line end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", os.getenv("RK_PATH") or "/get_reward", {["Content-Type"] = "application/json"}, bodies[i])
end
"""

# Every body once per cycle across wrk's threads (thread t sends t, t + T, t + 2T, ...): no item is sent twice in a
# row by two threads, and a body list longer than the run never repeats (a KV or score cache would see repeats).
WRK_LUA_SPREAD = r"""
local threads = 0
function setup(thread) thread:set("tid", threads); threads = threads + 1 end
local bodies = {}
for line in io.lines(os.getenv("RK_BODIES")) do bodies[#bodies + 1] = line end
local n = tonumber(os.getenv("RK_THREADS"))
local i = nil
request = function()
  if i == nil then i = tid else i = i + n end
  return wrk.format("POST", os.getenv("RK_PATH") or "/get_reward", {["Content-Type"] = "application/json"},
                    bodies[i % #bodies + 1])
end
"""


def _wrk_seconds(tok: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}
    for u in ("us", "ms", "s", "m"):
        if tok.endswith(u):
            return float(tok[: -len(u)]) * units[u]
    return float(tok)


def drive_wrk(url: str, bodies: list[str], concurrency: int, seconds: float, tmp: Path,
              spread: bool = False) -> dict[str, Any]:
    """Closed-loop load with wrk (C, cheap per request, so the load generator is not the bottleneck on 2 cores).

    Each connection sends single-item requests back to back, cycling through ``bodies`` (``spread``: each body
    once per cycle over all threads, in order, see ``WRK_LUA_SPREAD``).
    """
    import re
    import shutil

    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not installed (apt-get install wrk); or run with --driver httpx")
    (tmp / "bodies.jsonl").write_text("\n".join(bodies) + "\n")
    (tmp / "rk.lua").write_text(WRK_LUA_SPREAD if spread else WRK_LUA)
    env = {**os.environ, "RK_BODIES": str(tmp / "bodies.jsonl"), "RK_THREADS": "2"}
    out = subprocess.run([exe, "-t", "2", "-c", str(concurrency), "-d", f"{seconds}s", "--latency", "--timeout", "60s",
                          "-s", str(tmp / "rk.lua"), url], capture_output=True, text=True, env=env, check=True).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    wall = _wrk_seconds(re.search(r"requests in ([\d.]+\w+),", out).group(1))  # type: ignore[union-attr]
    lat = {m.group(1): _wrk_seconds(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"wall_s": wall, "requests": reqs, "p50_s": lat.get("50", float("nan")), "p99_s": lat.get("99", float("nan")),
            "non_2xx": int(errors.group(1)) if errors else 0, "raw": out}
