"""GRPO traffic as trainers send it, over HTTP: one sample per ``POST /get_reward`` (OpenRLHF's shape: ``query`` is
prompt and completion in one chat-formatted string, ``prompts`` its prompt part; ``--no-prompts`` sends the query
alone), many in flight, the K completions of each prompt sent one after another. rewardkit with its prompt KV cache across requests on and off, against the naive serve_rm-like server,
same model, same load, one run (issue 19).

    .venv/bin/python bench/bench_grpo_http.py                       # tiny + SmolLM2, K = 1/4/8, 16 and 64 in flight
    .venv/bin/python bench/bench_grpo_http.py --quick               # tiny model only, short runs (~2 min)

Workload: prompts of 100-160 words and completions of 20-40 (prompt ~4x completion in tokens), P prompts x K. Every
body is sent once per cycle over wrk's threads and the list is longer than a run, so no item and no prompt repeats
(``wrapped`` in the JSON says when a run did cycle). The three servers stay up for the whole run and each cell runs
them in turn, ``--repeats`` times, so slow drift of the machine hits all three alike; a cell's numbers are medians.

Prints and writes (bench/results/grpo_http.json) per model, K and concurrency: tokens/s, p50/p99, the ratio to the
naive server, the KV cache's hit rate (items that reused a stored prompt / items looked up, from /metrics) and the
ratio cache-on / cache-off.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    drive,
    drive_wrk,
    grpo_workload,
    openrlhf_body,
    parse_kv_metrics,
    python,
    start_process,
    stop_process,
    write_json,
)

CONFIGS = (("naive", []), ("cache_off", ["--prefix-cache-mb", "0"]), ("cache_on", []))


_FORMATTERS: dict[str | None, object] = {}


def texts_and_tokens(model: str | None, pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], int]:
    """Each pair as one chat-formatted query, its prompt part (OpenRLHF's ``prompts``), and the tokens of all."""
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model

    if model not in _FORMATTERS:
        _FORMATTERS[model] = Formatter(load_reward_model(model).tokenizer, max_length=2048)
    fmt: Formatter = _FORMATTERS[model]  # type: ignore[assignment]
    rendered = [fmt.render(ScoreItem(prompt=p, response=c)) for p, c in pairs]
    texts, prompts = [r[0] for r in rendered], [r[0][:r[1]] for r in rendered]
    return texts, prompts, sum(fmt.encode(ScoreItem(text=t)).num_tokens for t in texts)


def kv_counters(url: str) -> dict[str, float]:
    got = parse_kv_metrics(httpx.get(url + "/metrics", timeout=10).text)
    return {name: got.get(f"{name}_total", 0.0) for name in ("hits", "misses", "tokens_saved")}


def wait_idle(pid: int, timeout: float = 120.0) -> float:
    """Wait until a server process stops using the CPU (a sequential server keeps working through requests wrk
    left behind; the next server's run must not share the cores with that backlog). Returns the seconds waited."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu() -> float:
        with open(f"/proc/{pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / tick

    t0 = time.monotonic()
    last = cpu()
    while time.monotonic() - t0 < timeout:
        time.sleep(0.5)
        now = cpu()
        if now - last < 0.05:  # under 10% of one core over half a second
            break
        last = now
    return time.monotonic() - t0


def start_servers(model: str | None, tmp: Path, name: str) -> dict[str, tuple[str, object]]:
    margs = [] if model is None else ["--model", model]
    out = {}
    for i, (label, extra) in enumerate(CONFIGS):
        port = 8750 + i
        url = f"http://127.0.0.1:{port}"
        cmd = ([python(), str(ROOT / "bench/naive_server.py"), *margs, "--port", str(port)] if label == "naive" else
               [python(), "-m", "rewardkit.cli", "serve", *margs, "--port", str(port), "--max-wait-ms", "5", *extra])
        out[label] = (url, start_process(cmd, url, tmp / f"{name}-{label}.log"))
    return out


def spread_order(pairs: list[tuple[str, str]], k: int, spread: int) -> list[tuple[str, str]]:
    """``spread`` > 1: within each block of ``spread`` prompts, send the first completion of every prompt, then the
    second, ... (rollouts that finish generating at different times: mates ``spread - 1`` items apart)."""
    if spread <= 1:
        return pairs
    groups = [pairs[i:i + k] for i in range(0, len(pairs), k)]
    out: list[tuple[str, str]] = []
    for b in range(0, len(groups), spread):
        block = groups[b:b + spread]
        out += [g[j] for j in range(k) for g in block if j < len(g)]
    return out


def run_cell(servers: dict[str, tuple[str, object]], model: str | None, name: str, k: int, conc: int, seconds: int,
             repeats: int, n_items: int, tmp: Path, seed: int, driver: str = "wrk", spread: int = 1,
             prompts: bool = True) -> dict[str, object]:
    import json

    n_prompts = max(1, n_items // k)
    per: dict[str, list[dict[str, float]]] = {label: [] for label, _ in CONFIGS}
    for rep in range(repeats):
        # new prompts per repeat (the same for the three servers): nothing a cache kept is asked again
        pairs = spread_order(grpo_workload(n_prompts, k, (100, 160), (20, 40), seed=seed + rep), k, spread)
        texts, prompt_parts, tokens = texts_and_tokens(model, pairs)
        sent = prompt_parts if prompts else None
        bodies = [json.dumps(openrlhf_body(t, None if sent is None else sent[i])) for i, t in enumerate(texts)]
        for label, _ in CONFIGS:
            url = servers[label][0]
            before = kv_counters(url) if label != "naive" else None
            if driver == "wrk":
                res = drive_wrk(url, bodies, conc, seconds, tmp, spread=True)
            else:  # a fixed set, each item once, timed to the last answer (no batch cut off by a time window)
                res = asyncio.run(drive(url, texts, conc, prompts=sent))
            wait_idle(servers[label][1].pid)  # type: ignore[attr-defined]
            after = kv_counters(url) if label != "naive" else None
            served = res["requests"] * tokens / len(texts)
            row = {"tokens_per_s": served / res["wall_s"], "p50_ms": res["p50_s"] * 1e3, "p99_ms": res["p99_s"] * 1e3,
                   "requests": res["requests"], "non_2xx": res.get("non_2xx", 0), "wrapped": res["requests"] > len(bodies)}
            if before is not None and after is not None:
                looked = (after["hits"] - before["hits"]) + (after["misses"] - before["misses"])
                row["hit_rate"] = (after["hits"] - before["hits"]) / looked if looked else 0.0
                row["tokens_saved"] = after["tokens_saved"] - before["tokens_saved"]
            per[label].append(row)
    cell: dict[str, object] = {"model": name, "k": k, "concurrency": conc, "repeats": repeats, "driver": driver,
                               "spread": spread, "prompts_sent": prompts,
                               "items_per_repeat": len(texts), "mean_tokens": tokens / len(texts)}
    med = {label: statistics.median(r["tokens_per_s"] for r in rows) for label, rows in per.items()}
    for label, rows in per.items():
        cell[label] = {"tokens_per_s": med[label], "runs_tokens_per_s": [r["tokens_per_s"] for r in rows],
                       "p50_ms": statistics.median(r["p50_ms"] for r in rows),
                       "p99_ms": statistics.median(r["p99_ms"] for r in rows),
                       "non_2xx": sum(int(r["non_2xx"]) for r in rows), "wrapped": any(r["wrapped"] for r in rows),
                       "ratio_vs_naive": med[label] / med["naive"]}
        if label != "naive":
            cell[label]["hit_rate"] = statistics.median(float(r.get("hit_rate", 0.0)) for r in rows)
    cell["cache_on_over_off"] = med["cache_on"] / med["cache_off"]
    return cell


def show(cell: dict[str, object]) -> None:
    on, off, naive = cell["cache_on"], cell["cache_off"], cell["naive"]
    assert isinstance(on, dict) and isinstance(off, dict) and isinstance(naive, dict)
    print(f"{cell['model']:>8} K={cell['k']} c={cell['concurrency']:>2} s={cell['spread']} | naive {naive['tokens_per_s']:8.0f} tok/s | "
          f"off {off['tokens_per_s']:8.0f} (x{off['ratio_vs_naive']:.2f}) | on {on['tokens_per_s']:8.0f} "
          f"(x{on['ratio_vs_naive']:.2f}, hit {on['hit_rate']:.2f}) | on/off {cell['cache_on_over_off']:.2f} | "
          f"p99 naive/off/on {naive['p99_ms']:.0f}/{off['p99_ms']:.0f}/{on['p99_ms']:.0f} ms"
          + ("  WRAPPED" if on["wrapped"] or off["wrapped"] else ""), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, K = 1 and 8, 16 in flight, 5 s runs")
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--concurrency", default="16,64")
    ap.add_argument("--seconds", type=int, default=10, help="wrk duration per run (SmolLM2: x2)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench/results/grpo_http.json"))
    ap.add_argument("--driver", choices=["wrk", "httpx"], default=None,
                    help="load generator (default: wrk for the tiny model, httpx with a fixed item set for SmolLM2)")
    ap.add_argument("--items", type=int, default=64, help="items per run with the httpx driver")
    ap.add_argument("--spread", type=int, default=1, help="interleave the mates of this many prompts (1: K in a row)")
    ap.add_argument("--append", action="store_true", help="add the cells to those already in --json (other models)")
    ap.add_argument("--no-prompts", action="store_true",
                    help="send only query (older OpenRLHF): no response start, so a pooled read-out reuses nothing")
    a = ap.parse_args()
    if a.quick:
        a.models, a.ks, a.concurrency, a.seconds, a.repeats = "tiny", "1,8", "16", 5, 1
    from rewardkit.core.testing import make_tiny_reward_model

    tmp = Path(tempfile.mkdtemp(prefix="rk-grpo-http-"))
    models = {"tiny": str(make_tiny_reward_model(tmp / "tiny", arch="llama", hidden=64, layers=2)), "smollm2": None}
    cells: list[dict[str, object]] = []
    if a.append and Path(a.json).exists():
        import json

        cells = [c for c in json.loads(Path(a.json).read_text())["cells"]
                 if c["model"] not in a.models.split(",") or c.get("spread", 1) != a.spread]
    for name in a.models.split(","):
        model = models[name]
        seconds = a.seconds * (2 if name == "smollm2" else 1)
        # wrk (tiny): a timed window over more distinct items than a run can take (~200 req/s here). httpx
        # (SmolLM2): a batch of 16 items takes ~5 s on this CPU, so a timed window would cut a third of the work
        # off; instead a fixed set of items, each once, timed to the last answer.
        driver = a.driver or ("wrk" if name == "tiny" else "httpx")
        n_items = (4000 if name == "tiny" else 400) if driver == "wrk" else a.items
        servers = start_servers(model, tmp, name)
        try:
            for k in (int(x) for x in a.ks.split(",")):
                for conc in (int(x) for x in a.concurrency.split(",")):
                    cell = run_cell(servers, model, name, k, conc, seconds, a.repeats, n_items, tmp,
                                    seed=1000 * k + conc, driver=driver, spread=a.spread, prompts=not a.no_prompts)
                    show(cell)
                    cells.append(cell)
                    write_json(Path(a.json), {"cells": cells, "args": vars(a)})  # partial results survive a crash
        finally:
            for _, proc in servers.values():
                stop_process(proc)  # type: ignore[arg-type]
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
