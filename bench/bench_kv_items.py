"""What the prompt KV cache can give at most, in process: GRPO items scored one per call, as the CPU server's
padding-free path runs them (one forward per item), with the cache on and off, side by side (issue 19).

The naive server's forward for a one-item request is the cache-off forward, so the on / off ratio here bounds what
the cache can add over it once HTTP costs nothing. A cProfile of the cache-on rounds says where a hit's time goes.

    .venv/bin/python bench/bench_kv_items.py --model tiny --threads 1          # ~1 minute
    .venv/bin/python bench/bench_kv_items.py --model smollm2 --prompts 4       # the default model (~3 minutes)

Prints ms per item for each round and the median on / off ratio; writes JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import grpo_workload, write_json  # noqa: E402

from rewardkit.core.formatting import Formatter, ScoreItem  # noqa: E402
from rewardkit.core.loading import load_reward_model  # noqa: E402
from rewardkit.core.scoring import Scorer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny (the GRPO bench's 2-layer Llama), smollm2, or a directory")
    ap.add_argument("--prompts", type=int, default=30)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved off / on rounds")
    ap.add_argument("--cache-mb", type=float, default=64.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    path: str | None = a.model
    if a.model == "tiny":
        from rewardkit.core.testing import make_tiny_reward_model

        path = str(make_tiny_reward_model(Path(tempfile.mkdtemp()) / "tiny", arch="llama", hidden=64, layers=2))
    elif a.model == "smollm2":
        path = None
    rm = load_reward_model(path, device="cpu")
    fmt = Formatter(rm.tokenizer, max_length=2048)
    pairs = grpo_workload(a.prompts, a.k, (100, 160), (20, 40), 0)  # bench_grpo_http's shapes
    items = [fmt.encode(ScoreItem(prompt=p, response=c), i) for i, (p, c) in enumerate(pairs)]
    prompt_frac = statistics.mean(it.response_token_indices()[0] / it.num_tokens for it in items)
    rounds: dict[str, list[float]] = {"off": [], "on": []}
    rewards: dict[str, list[float]] = {}
    prof = cProfile.Profile()
    with torch.inference_mode():
        for r in range(a.rounds):
            for label, mb in (("off", 0.0), ("on", a.cache_mb)):
                s = Scorer(rm, padding_free=True, prefix_cache_bytes=int(mb * 2**20))  # a cold cache each round
                if label == "on" and r == a.rounds - 1:
                    prof.enable()
                t = time.perf_counter()
                rewards[label] = [s.score([it])[0].reward for it in items]
                rounds[label].append((time.perf_counter() - t) / len(items) * 1000)
                prof.disable()
                print(f"round {r} cache {label:>3}: {rounds[label][-1]:.2f} ms/item", flush=True)
    ratio = statistics.median(o / n for o, n in zip(rounds["off"], rounds["on"], strict=True))
    diff = max(abs(x - y) for x, y in zip(rewards["off"], rewards["on"], strict=True))
    st = pstats.Stats(prof)
    total = max(st.total_tt, 1e-9)  # type: ignore[attr-defined]
    own = {f"{Path(f).name}:{fn}" if f != "~" else fn: tt for (f, _, fn), (_, _, tt, _, _) in st.stats.items()}  # type: ignore[attr-defined]
    top = sorted(own.items(), key=lambda kv: -kv[1])[:8]
    print(f"items {len(items)} (K={a.k}), mean {statistics.mean(it.num_tokens for it in items):.0f} tokens, "
          f"prompt {prompt_frac:.2f} of them; cache on / off: x{ratio:.2f} per item (median of {a.rounds}); "
          f"max |reward diff| {diff:.1e}")
    print("cache-on round, own time:", ", ".join(f"{k} {v / total:.0%}" for k, v in top))
    if a.json:
        write_json(Path(a.json), {"model": a.model, "items": len(items), "k": a.k, "threads": torch.get_num_threads(),
                                  "ms_per_item": rounds, "on_over_off_speedup": round(ratio, 3),
                                  "prompt_fraction": round(prompt_frac, 3), "max_abs_diff": diff,
                                  "profile_own_time_fraction": {k: round(v / total, 3) for k, v in top}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
