"""Shared-prefix scoring benchmark: GRPO-shaped load on SmolLM2-135M, in one process, on one machine.

Methods, each over the same encoded items (K completions per prompt, prompts ~4x longer than completions):

- ``naive``: one item per forward, as OpenRLHF's ``serve_rm`` sees a GRPO step sent one item per request (no
  batching across requests; a one-item batch has no padding). In process: no HTTP cost is charged to it.
- ``plain_padded``: rewardkit's plain batched path: the scheduler's length-sorted batches (``select_batch``,
  16384-token budget, 25% padding cap), one padded forward each, sharing off.
- ``plain_unpadded``: rewardkit's CPU default with sharing off: the same batches, one unpadded forward per item.
- ``shared``: rewardkit's CPU default (sharing on): the same batches selected with prefix keys, ``Scorer.score_unpadded``
  (each prompt group: the prompt once, completions against its KV cache; other items alone).

Methods are interleaved over ``--rounds`` rounds and the best wall time of each is kept (the CPU is shared).
Effective FLOP/s = 2 x non-embedding params x (tokens a plain forward of every item needs) / wall time, against a
fp32 matmul peak measured in the same run. Writes bench/results/prefix.json.

    .venv/bin/python bench/bench_prefix.py            # ~3-5 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import grpo_workload, matmul_peak_gflops  # noqa: E402
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem  # noqa: E402
from rewardkit.core.loading import load_reward_model  # noqa: E402
from rewardkit.core.prefix import prefix_key  # noqa: E402
from rewardkit.core.scoring import Scorer  # noqa: E402
from rewardkit.server.scheduler import select_batch  # noqa: E402

MAX_BATCH_TOKENS, MAX_BATCH_SIZE, MAX_PADDING = 16384, 64, 0.25  # the server's defaults


def batches(encs: Sequence[EncodedItem], keyed: bool) -> list[list[int]]:
    """Drain a queue holding every item (a GRPO step) with the scheduler's batch selection."""
    pending = list(range(len(encs)))
    keys = [prefix_key(e) for e in encs] if keyed else None
    out = []
    while pending:
        idx = select_batch([encs[i].num_tokens for i in pending], [float(i) for i in pending], MAX_BATCH_TOKENS,
                           MAX_BATCH_SIZE, MAX_PADDING, None if keys is None else [keys[i] for i in pending])
        chosen = [pending[i] for i in idx]
        out.append(chosen)
        pending = [p for p in pending if p not in set(chosen)]
    return out


def time_methods(encs: list[EncodedItem], plain: Scorer, shared: Scorer, plain_b: list[list[int]],
                 keyed_b: list[list[int]], rounds: int) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Best wall time and the rewards of each method, methods interleaved over ``rounds``."""

    def run_batches(bs: list[list[int]], fn: Callable[[list[EncodedItem]], list[Any]]) -> list[float]:
        out: dict[int, float] = {}
        for b in bs:
            for i, s in zip(b, fn([encs[i] for i in b]), strict=True):
                out[i] = s.reward
        return [out[i] for i in range(len(encs))]

    methods: dict[str, Callable[[], list[float]]] = {
        "naive": lambda: [plain.score_batch([e])[0].reward for e in encs],
        "plain_padded": lambda: run_batches(plain_b, plain.score_batch),
        "plain_unpadded": lambda: run_batches(plain_b, lambda es: plain.score_unpadded(es)),
        "shared": lambda: run_batches(keyed_b, lambda es: shared.score_unpadded(es)),
    }
    best = {name: float("inf") for name in methods}
    rewards: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, fn in methods.items():
            t = time.perf_counter()
            rewards[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return best, rewards


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".prefix-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=32, help="items per workload (K=8: items/8 prompts)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds; best wall time per method is kept")
    ap.add_argument("--prompt-words", type=int, nargs=2, default=(100, 200))
    ap.add_argument("--completion-words", type=int, nargs=2, default=(20, 55))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prefix.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    load_start = os.getloadavg()
    peak = matmul_peak_gflops()
    rm = load_reward_model(None)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    params = sum(p.numel() for p in rm.model.parameters())
    embed = rm.body.get_input_embeddings().weight.numel()
    flop_params = params - embed  # the embedding is a lookup, not a matmul
    plain, shared = Scorer(rm, prefix_sharing=False), Scorer(rm, prefix_sharing=True)

    results: dict[str, Any] = {"model": rm.model_id, "params": params, "non_embedding_params": flop_params,
                               "matmul_peak_gflops": round(peak, 1), "torch_threads": torch.get_num_threads(),
                               "workloads": {}}
    for k in (8, 1):
        wl = grpo_workload(args.items // k, k, tuple(args.prompt_words), tuple(args.completion_words), seed=k)
        encs = [fmt.encode(ScoreItem(prompt=p, response=c)) for p, c in wl]
        tokens = sum(e.num_tokens for e in encs)
        prompt_tok = sum(e.response_token_indices()[0] for e in encs) / len(encs)
        plain_b = batches(encs, keyed=False)
        shared.score_batch(encs[:k + 1])  # warm-up (and the one-time support probe)
        before = shared.prefix.stats.snapshot()
        best, rewards = time_methods(encs, plain, shared, plain_b, batches(encs, keyed=True), args.rounds)
        st = shared.prefix.stats
        computed = (st.tokens_computed - before.tokens_computed) / args.rounds
        total_shared = (st.tokens_total - before.tokens_total) / args.rounds
        row: dict[str, Any] = {
            "k": k, "items": len(encs), "tokens": tokens, "mean_item_tokens": round(tokens / len(encs), 1),
            "mean_prompt_tokens": round(prompt_tok, 1), "batches": len(plain_b),
            "shared_tokens_computed_fraction": round((tokens - total_shared + computed) / tokens, 3),
            "max_abs_diff_vs_naive": max(max(abs(a - b) for a, b in zip(rewards[m], rewards["naive"], strict=True))
                                         for m in best),
        }
        for name, wall in best.items():
            eff = 2 * flop_params * tokens / wall / 1e9
            row[name] = {"wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
                         "effective_gflops": round(eff, 1),
                         "x_naive": round(best["naive"] / wall, 2)}
        results["workloads"][f"k{k}"] = row
        print(f"K={k}: {len(encs)} items, {tokens} tokens (mean {row['mean_item_tokens']}, prompt "
              f"{row['mean_prompt_tokens']}), max |diff| {row['max_abs_diff_vs_naive']:.2e}", flush=True)
        print(f"  {'method':<15}{'tok/s':>9}{'x naive':>9}{'GFLOP/s':>9}{'/ peak':>8}")
        for name in best:
            r = row[name]
            print(f"  {name:<15}{r['tokens_per_s']:>9.0f}{r['x_naive']:>9.2f}{r['effective_gflops']:>9.1f}"
                  f"{r['effective_gflops'] / peak:>8.2f}", flush=True)
    results["matmul_peak_gflops_end"] = round(matmul_peak_gflops(), 1)
    top = max(peak, results["matmul_peak_gflops_end"])  # the better of the two measurements: the stricter ratio
    for row in results["workloads"].values():
        for name in ("naive", "plain_padded", "plain_unpadded", "shared"):
            row[name]["effective_over_peak"] = round(row[name]["effective_gflops"] / top, 3)
    results["loadavg_1m_start_end"] = [round(load_start[0], 2), round(os.getloadavg()[0], 2)]  # shared CPU: context
    results["wall_s_total"] = round(time.perf_counter() - t0, 1)
    results["command"] = "python bench/bench_prefix.py " + " ".join(sys.argv[1:])
    print(f"matmul peak {results['matmul_peak_gflops']} GFLOP/s (start), {results['matmul_peak_gflops_end']} (end); "
          f"{results['wall_s_total']} s total; load average {results['loadavg_1m_start_end']}")
    write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
