"""Ray Serve: one replica against two, beside plain ``rewardkit serve``, same model, same load, one run.

    .venv/bin/python bench/bench_ray_replicas.py             # tiny model + SmolLM2-135M, wrk
    .venv/bin/python bench/bench_ray_replicas.py --quick     # tiny model only, shorter

The load is bench_serving.py's (GRPO-shaped groups, /get_reward bodies, wrk at --concurrency). Configurations:
plain serve (the baseline: one process, no Ray), --ray --replicas 1 (--num-cpus = all cores), --ray --replicas 2
(--num-cpus = half each). On a 2-core machine two replicas share the cores the one replica had, so expect little
gain; the row says what Serve's proxy costs (a second HTTP hop) and what splitting the cores gives. Writes
bench/results/ray_replicas.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import chat_texts, count_tokens_and_params  # noqa: E402
from common import ROOT, drive, drive_wrk, grpo_workload, python, start_process, stop_process, write_json  # noqa: E402


def run_model(name: str, model: str | None, pairs: list[tuple[str, str]], concurrency: int, seconds: int,
              tmp: Path) -> list[dict[str, object]]:
    texts = chat_texts(model, pairs)
    tokens, _ = count_tokens_and_params(model, texts)
    bodies = [json.dumps({"query": [t]}) for t in texts]
    margs = [] if model is None else ["--model", model]
    cpus = len(os.sched_getaffinity(0))
    serve = [python(), "-m", "rewardkit.cli", "serve", *margs, "--max-wait-ms", "5"]
    configs = [
        ("plain serve", [*serve, "--port", "8741"], 8741),
        ("ray, 1 replica", [*serve, "--port", "8742", "--ray", "--replicas", "1", "--num-cpus", str(cpus)], 8742),
        ("ray, 2 replicas", [*serve, "--port", "8743", "--ray", "--replicas", "2", "--num-cpus", str(cpus / 2)],
         8743),
    ]
    rows: list[dict[str, object]] = []
    base = one = None
    for label, cmd, port in configs:
        url = f"http://127.0.0.1:{port}"
        proc = start_process(cmd, url, tmp / f"{name}-{port}.log")
        try:
            asyncio.run(drive(url, texts[: min(len(texts), 4 * concurrency)], concurrency))  # warm-up, every replica
            res = drive_wrk(url, bodies, concurrency, seconds, tmp)
        finally:
            stop_process(proc)
        tps = res["requests"] * tokens / len(texts) / res["wall_s"]
        base = base or tps
        if label == "ray, 1 replica":
            one = tps
        row = {"model": name, "server": label, "requests": res["requests"], "non_2xx": res.get("non_2xx", 0),
               "tokens_per_s": tps, "requests_per_s": res["requests"] / res["wall_s"], "p50_ms": res["p50_s"] * 1e3,
               "p99_ms": res["p99_s"] * 1e3, "ratio_vs_plain": tps / base,
               "ratio_vs_1_replica": tps / one if one else None}
        rows.append(row)
        print(f"{name:>8} | {label:<16} | {tps:8.0f} tok/s | {row['requests_per_s']:6.1f} req/s | "
              f"p50 {row['p50_ms']:7.1f} ms | p99 {row['p99_ms']:7.1f} ms | x{row['ratio_vs_plain']:.2f} plain"
              + (f" | x{row['ratio_vs_1_replica']:.2f} 1 replica" if one else ""), flush=True)
    return rows


def proxy_ceiling(model: str, seconds: int, tmp: Path) -> list[dict[str, object]]:
    """Requests/s of GET /health (no model work) straight to uvicorn and through Serve's proxy: what the extra hop
    costs, and the request rate one proxy (one core here) can route before the router is the limit."""
    import re
    import shutil
    import subprocess

    exe = shutil.which("wrk")
    if exe is None:
        raise RuntimeError("wrk not installed (apt-get install wrk)")
    serve = [python(), "-m", "rewardkit.cli", "serve", "--model", model]
    rows: list[dict[str, object]] = []
    for label, cmd, port in (("plain serve", [*serve, "--port", "8744"], 8744),
                             ("ray, 1 replica", [*serve, "--port", "8745", "--ray"], 8745)):
        url = f"http://127.0.0.1:{port}"
        proc = start_process(cmd, url, tmp / f"health-{port}.log")
        try:
            out = subprocess.run([exe, "-t", "2", "-c", "16", "-d", f"{seconds}s", "--latency", url + "/health"],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            stop_process(proc)
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        rows.append({"model": "none (GET /health)", "server": label, "requests_per_s": rps})
        print(f"GET /health | {label:<16} | {rps:8.0f} req/s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=int, default=15, help="wrk duration per configuration")
    ap.add_argument("--proxy-only", action="store_true", help="only the GET /health proxy ceiling; results are "
                    "merged into the existing ray_replicas.json")
    args = ap.parse_args()
    from rewardkit.core.testing import make_tiny_reward_model

    tmp = Path(tempfile.mkdtemp(prefix="rk-bench-ray-"))
    tiny = str(make_tiny_reward_model(tmp / "tiny", arch="llama", hidden=64, layers=2))
    out = ROOT / "bench/results/ray_replicas.json"
    if args.proxy_only:
        data = json.loads(out.read_text()) if out.exists() else {"rows": []}
        data["proxy"] = proxy_ceiling(tiny, args.seconds, tmp)
        write_json(out, data)
        return
    p, k = (8, 4) if args.quick else (16, 8)
    rows = run_model("tiny", tiny, grpo_workload(p * 4, k, (40, 250), (10, 150)), args.concurrency,
                     args.seconds, tmp)
    if not args.quick:
        rows += run_model("smollm2", None, grpo_workload(8, 4, (40, 250), (10, 150), seed=1), args.concurrency,
                          args.seconds * 2, tmp)
    proxy = proxy_ceiling(tiny, 10, tmp)
    write_json(out, {"rows": rows, "proxy": proxy, "concurrency": args.concurrency,
                     "cpus": len(os.sched_getaffinity(0))})


if __name__ == "__main__":
    main()
