"""Does scoring wait for the R2M updater? p99 of ``/v1/r2m/rewards`` idle vs while the updater works through a
backlog, with the updater in the server (as before) and in its own pinned process (``rewardkit r2m-updater``), in
one run (issue 22, part 4).

    .venv/bin/python bench/bench_r2m_isolation.py            # ~3 min; writes bench/results/r2m_isolation.json
    .venv/bin/python bench/bench_r2m_isolation.py --quick    # smaller backlog and fewer requests

Setups (one real redis-server for both; tiny Llama RM, R2M d_policy 576, d_attn 256, 10 GREBT steps per update):

- ``in_server``: ``rewardkit serve`` with its updater thread (the default deployment), both cores.
- ``own_process``: the server pinned to CPU 0 (``taskset``-style affinity) with ``REWARDKIT_R2M_UPDATER=false``,
  and ``rewardkit r2m-updater --cpus 1`` on CPU 1, sharing the stream and the head store.

Per setup: ``--requests`` sequential scoring requests (4 items with policy states) while nothing else runs (idle),
then ``--groups`` feedback groups are sent at once and scoring requests are sent until the updater has applied all
of them (busy). Reported: p50/p99 idle and busy, their ratio, the updater's wall time and the updates it made.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.helpers import RedisProcess, ServerProcess  # noqa: E402

D_P, SEQ = 576, 256
ENV = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(D_P), "REWARDKIT_R2M_D_ATTN": "256", "REWARDKIT_R2M_LR": "1e-4",
       "REWARDKIT_R2M_GROUP_SIZE": "4", "REWARDKIT_R2M_STEPS_PER_UPDATE": "10", "REWARDKIT_R2M_TOTAL_ROUNDS": "100",
       "REWARDKIT_R2M_KEEP_VERSIONS": "0"}
OCTET = {"content-type": "application/octet-stream"}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def applied_groups(store: Path) -> int:
    from rewardkit.core.r2m import read_head_metadata

    return sum(len((read_head_metadata(p).get("extra") or {}).get("applied", ()))
               for p in store.rglob("r2m-*.safetensors"))


def measure(url: str, store: Path, n_req: int, n_groups: int, tag: str) -> dict[str, Any]:
    from rewardkit.client.feedback import FeedbackStream
    from rewardkit.core.wire import encode_stream

    rng = np.random.default_rng(0)
    items = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}. " * 3} for i in range(4)]
    hidden = [rng.normal(size=(SEQ, D_P)).astype(np.float32) for _ in range(4)]
    frames = [rng.normal(size=(SEQ, D_P)).astype(np.float32) for _ in range(8)]
    seq_no = iter(range(10**9))
    c = httpx.Client(timeout=60)

    def r2m() -> float:
        n = next(seq_no)  # fresh texts: the server's H_last cache must not answer for the RM
        body = encode_stream([({"group_id": f"{tag}q{n}", "index": i, "round": 10,
                                "item": {**items[i], "prompt": f"[{n}] " + items[i]["prompt"]}}, hidden[i], "bfloat16")
                              for i in range(4)])
        t = time.perf_counter()
        r = c.post(url + "/v1/r2m/rewards", content=body, headers=OCTET)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    for _ in range(10):
        r2m()
    idle = [r2m() for _ in range(n_req)]
    before = applied_groups(store)
    with FeedbackStream(url, dtype="bfloat16", batch_frames=32) as fs:
        for g in range(n_groups):
            for i in range(4):
                fs.add(f"{tag}u{g}", i, 20, frames[(g + i) % 8], {"prompt": f"U {g}?", "response": f"a {i}"})
        fs.flush(complete_groups=False)
    busy: list[float] = []
    t0 = time.perf_counter()
    while applied_groups(store) - before < n_groups and time.perf_counter() - t0 < 300:
        busy.append(r2m())
    updater_s = time.perf_counter() - t0
    c.close()
    res = {"idle_n": len(idle), "busy_n": len(busy), "updater_s": updater_s,
           "groups_applied": applied_groups(store) - before,
           "p50_ms_idle": 1000 * statistics.median(idle), "p99_ms_idle": 1000 * pct(idle, 0.99),
           "p50_ms_busy": 1000 * statistics.median(busy) if busy else None,
           "p99_ms_busy": 1000 * pct(busy, 0.99) if busy else None}
    res["p99_busy_over_idle"] = res["p99_ms_busy"] / res["p99_ms_idle"] if busy else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--groups", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=1, help="own-process runs (the median one is reported)")
    ap.add_argument("--pin-client", action="store_true",
                    help="pin this (client) process to the server's CPU during the own-process runs")
    ap.add_argument("--json", default=str(ROOT / "bench/results/r2m_isolation.json"))
    a = ap.parse_args()
    if a.quick:
        a.requests, a.groups = 30, 8
    if len(os.sched_getaffinity(0)) < 2:
        raise SystemExit("needs 2 CPUs (one for the server, one for the updater)")
    from rewardkit.core.testing import make_tiny_reward_model

    tmp = Path(tempfile.mkdtemp(prefix="rk-r2m-iso-"))
    model = make_tiny_reward_model(tmp / "rm", arch="llama")
    cpus = sorted(os.sched_getaffinity(0))
    out: dict[str, Any] = {"cpus": cpus, "requests": a.requests, "groups": a.groups, "steps_per_update": 10}
    t_all = time.time()
    with RedisProcess(tmp) as rp:
        with ServerProcess(model, tmp, "--redis-url", rp.url, "--max-length", "256",
                           env={**ENV, "REWARDKIT_REDIS_NAMESPACE": "inserver"}) as srv:
            out["in_server"] = measure(srv.url, tmp / f"state-{srv.port}" / "r2m", a.requests, a.groups, "a")
        reps = []
        for k in range(a.repeats):
            env = {**ENV, "REWARDKIT_REDIS_NAMESPACE": f"ownproc{k}", "REWARDKIT_R2M_UPDATER": "false",
                   "OMP_NUM_THREADS": "1"}
            srv = ServerProcess(model, tmp, "--redis-url", rp.url, "--max-length", "256", env=env)
            srv.cmd = ["taskset", "-c", str(cpus[0]), *srv.cmd]
            srv.start()
            state = tmp / f"state-{srv.port}"
            log = open(tmp / "updater.log", "ab")  # noqa: SIM115
            up = subprocess.Popen([sys.executable, "-m", "rewardkit.cli", "r2m-updater", "--model", str(model),
                                   "--redis-url", rp.url, "--state-dir", str(state), "--cpus", str(cpus[1])],
                                  stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env})
            mine = os.sched_getaffinity(0)
            try:
                time.sleep(3.0)  # the updater loads and joins the consumer group
                if a.pin_client:  # the client beside the server, so the updater's core runs the updater alone
                    os.sched_setaffinity(0, {cpus[0]})
                reps.append(measure(srv.url, state / "r2m", a.requests, a.groups, f"b{k}"))
            finally:
                os.sched_setaffinity(0, mine)
                up.terminate()
                up.wait(30)
                srv.stop()
        out["own_process_repeats"] = reps
        order = sorted(range(len(reps)), key=lambda i: reps[i]["p99_busy_over_idle"] or float("inf"))
        out["own_process"] = reps[order[len(order) // 2]]  # the median repeat by its ratio
        out["pin_client"] = a.pin_client
    out["wall_s"] = time.time() - t_all
    if len(out["own_process_repeats"]) > 1:
        print("own_process repeats, p99 busy/idle: " + ", ".join(f"{r['p99_busy_over_idle']:.2f}"
                                                                   for r in out["own_process_repeats"]))
    for name in ("in_server", "own_process"):
        r = out[name]
        print(f"{name:>12}: p99 idle {r['p99_ms_idle']:.1f} ms, busy {r['p99_ms_busy']:.1f} ms "
              f"(x{r['p99_busy_over_idle']:.2f}); p50 idle/busy {r['p50_ms_idle']:.1f}/{r['p50_ms_busy']:.1f} ms; "
              f"{r['busy_n']} requests while {r['groups_applied']} groups took {r['updater_s']:.1f} s", flush=True)
    Path(a.json).write_text(json.dumps(out, indent=1))
    print(f"wall {out['wall_s']:.0f} s; wrote {a.json}")


if __name__ == "__main__":
    main()
