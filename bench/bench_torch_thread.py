"""One torch thread or two: what a second thread that touches torch costs the forwards (docs/operations.md,
"One torch thread").

    .venv/bin/python bench/bench_torch_thread.py              # in process, then over HTTP (~4 min, SmolLM2)
    .venv/bin/python bench/bench_torch_thread.py --skip-http  # in process only (~1 min)

In process: one 300-token SmolLM2 item, the mean of 8 forwards on the main thread, in a fresh process per case:
only the main thread ever ran torch; the model loaded on another thread; a 64x64 matmul run once on another thread.
Over HTTP: the naive serve_rm-like server, rewardkit (forwards on the thread that loaded the model, the default) and
rewardkit with ``REWARDKIT_WORKER_MODE=inline`` (forwards on the event loop, the model loaded on another thread, as
before), 16 single-item K = 1 requests in flight, the same 36 items each, timed to the last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, drive, grpo_workload, python, start_process, stop_process, write_json  # noqa: E402

CASE = r"""
import sys, time, torch
from concurrent.futures import ThreadPoolExecutor
from rewardkit.core.loading import load_reward_model
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.scoring import Scorer
case = sys.argv[1]
ex = ThreadPoolExecutor(1)
rm = ex.submit(load_reward_model, None).result() if case == "load_on_other_thread" else load_reward_model(None)
if case == "small_op_on_other_thread":
    ex.submit(lambda: torch.randn(64, 64) @ torch.randn(64, 64)).result()
enc = Formatter(rm.tokenizer, max_length=2048).encode(ScoreItem(prompt="word " * 200, response="answer " * 40))
sc = Scorer(rm, padding_free=True)
sc.score([enc])
t0 = time.perf_counter()
for _ in range(8):
    sc.score([enc])
print((time.perf_counter() - t0) / 8 * 1e3)
"""


def in_process() -> dict[str, float]:
    out = {}
    for case in ("main_thread_only", "load_on_other_thread", "small_op_on_other_thread"):
        p = subprocess.run([python(), "-c", CASE, case], capture_output=True, text=True, check=True)
        out[case] = float(p.stdout.strip().splitlines()[-1])
        print(f"in process | {case:<26} | {out[case]:6.0f} ms per forward", flush=True)
    return out


def over_http(tmp: Path, repeats: int) -> dict[str, list[float]]:
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model

    fmt = Formatter(load_reward_model(None).tokenizer, max_length=2048)
    configs = {
        "naive": ([python(), str(ROOT / "bench/naive_server.py"), "--port", "8771"], None),
        "rewardkit": ([python(), "-m", "rewardkit.cli", "serve", "--port", "8772", "--prefix-cache-mb", "0"], None),
        "rewardkit_inline": ([python(), "-m", "rewardkit.cli", "serve", "--port", "8773", "--prefix-cache-mb", "0"],
                             {"REWARDKIT_WORKER_MODE": "inline"}),
    }
    out: dict[str, list[float]] = {name: [] for name in configs}
    for rep in range(repeats):
        texts = [fmt.render(ScoreItem(prompt=p, response=c))[0]
                 for p, c in grpo_workload(40, 1, (100, 160), (20, 40), seed=50 + rep)]
        for name, (cmd, env) in configs.items():
            url = f"http://127.0.0.1:{cmd[cmd.index('--port') + 1]}"
            proc = start_process(cmd, url, tmp / f"{name}.log", env_extra=env)
            try:
                asyncio.run(drive(url, texts[:4], 4))
                res = asyncio.run(drive(url, texts[4:], 16))
            finally:
                stop_process(proc)
            out[name].append((len(texts) - 4) / res["wall_s"])
            print(f"over HTTP | {name:<17} | {out[name][-1]:.2f} items/s (p50 {res['p50_s']:.1f} s)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--skip-http", action="store_true")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=str(ROOT / "bench/results/torch_thread.json"))
    a = ap.parse_args()
    res: dict[str, object] = {"in_process_ms": in_process()}
    if not a.skip_http:
        http = over_http(Path(tempfile.mkdtemp(prefix="rk-torch-thread-")), a.repeats)
        res["http_items_per_s"] = http
        base = sum(http["naive"]) / len(http["naive"])
        res["ratio_vs_naive"] = {k: sum(v) / len(v) / base for k, v in http.items()}
        print(json.dumps(res["ratio_vs_naive"]))
    write_json(Path(a.json), res)


if __name__ == "__main__":
    main()
