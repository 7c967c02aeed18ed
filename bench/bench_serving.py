"""Serving throughput: rewardkit vs a naive OpenRLHF-serve_rm-shaped baseline, same model, same load, one run.

    .venv/bin/python bench/bench_serving.py            # tiny model + SmolLM2-135M
    .venv/bin/python bench/bench_serving.py --quick    # smaller load

Prints tokens/s, model FLOP/s as a fraction of the measured matmul peak, p50/p99 latency and the ratio to the
baseline; writes bench/results/serving.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ROOT,
    drive,
    drive_wrk,
    grpo_workload,
    matmul_peak_gflops,
    python,
    start_process,
    stop_process,
    write_json,
)


def count_tokens_and_params(model: str | None, texts: list[str]) -> tuple[int, int]:
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model

    rm = load_reward_model(model)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    tokens = sum(fmt.encode(ScoreItem(text=t)).num_tokens for t in texts)
    emb = rm.model.get_input_embeddings().weight.numel()
    params = sum(p.numel() for p in rm.model.parameters()) - emb  # non-embedding params do the FLOPs
    return tokens, params


def chat_texts(model: str | None, pairs: list[tuple[str, str]]) -> list[str]:
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model

    rm = load_reward_model(model)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    return [fmt.render(ScoreItem(prompt=p, response=c))[0] for p, c in pairs]


def ref_tree(ref: str, tmp: Path) -> dict[str, str]:
    """A git worktree of ``ref`` and the PYTHONPATH that makes ``python -m rewardkit.cli`` run its code (the
    namespace package's portions on PYTHONPATH come before the editable install's)."""
    import subprocess

    wt = tmp / f"ref-{ref}"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), ref], check=True,
                   capture_output=True)
    parts = [wt / "core", wt / "server", wt / "clients" / "python", wt / "training"]
    return {"PYTHONPATH": ":".join(str(p) for p in parts)}


def run_model(name: str, model: str | None, pairs: list[tuple[str, str]], concurrency: int, peak: float,
              tmp: Path, driver: str, seconds: int, ref_env: dict[str, str] | None = None,
              ref: str = "") -> list[dict[str, object]]:
    import json

    texts = chat_texts(model, pairs)
    tokens, params = count_tokens_and_params(model, texts)
    bodies = [json.dumps({"query": [t]}) for t in texts]
    margs = [] if model is None else ["--model", model]
    rows = []
    configs = [
        ("naive (serve_rm-like)", [python(), str(ROOT / "bench/naive_server.py"), *margs, "--port", "8731"], 8731),
        ("rewardkit, no prefix sharing",
         [python(), "-m", "rewardkit.cli", "serve", *margs, "--port", "8732", "--no-prefix-sharing",
          "--max-wait-ms", "5"], 8732),
        ("rewardkit", [python(), "-m", "rewardkit.cli", "serve", *margs, "--port", "8733", "--max-wait-ms", "5"], 8733),
    ]
    if ref_env is not None:  # the same server at another commit, in the same run (before/after a refactor)
        configs.append((f"rewardkit @ {ref}", [python(), "-m", "rewardkit.cli", "serve", *margs, "--port", "8734",
                                               "--max-wait-ms", "5"], 8734))
        configs.append(("rewardkit (again)", configs[2][1], 8733))  # after, before, after: drift shows up
    base_tps = None
    for label, cmd, port in configs:
        url = f"http://127.0.0.1:{port}"
        proc = start_process(cmd, url, tmp / f"{name}-{port}-{len(label)}.log",
                             env_extra=ref_env if label.startswith("rewardkit @") else None)
        try:
            asyncio.run(drive(url, texts[: min(len(texts), 2 * concurrency)], concurrency))  # warm-up
            if driver == "wrk":
                res = drive_wrk(url, bodies, concurrency, seconds, tmp)
                # wrk cycles through the bodies; tokens served = requests x mean tokens per body
                served_tokens = res["requests"] * tokens / len(texts)
            else:
                res = asyncio.run(drive(url, texts, concurrency))
                served_tokens = tokens
        finally:
            stop_process(proc)
        tps = served_tokens / res["wall_s"]
        flops = 2 * params * served_tokens / res["wall_s"]
        base_tps = base_tps or tps
        row = {"model": name, "server": label, "driver": driver, "requests": res["requests"],
               "non_2xx": res.get("non_2xx", 0), "tokens_per_s": tps, "requests_per_s": res["requests"] / res["wall_s"],
               "model_gflops": flops / 1e9, "frac_of_peak": flops / 1e9 / peak, "p50_ms": res["p50_s"] * 1e3,
               "p99_ms": res["p99_s"] * 1e3, "ratio_vs_naive": tps / base_tps}
        rows.append(row)
        print(f"{name:>10} | {label:<30} | {tps:9.0f} tok/s | {row['frac_of_peak']:.2f} of peak | "
              f"p50 {row['p50_ms']:7.1f} ms | p99 {row['p99_ms']:7.1f} ms | x{row['ratio_vs_naive']:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--driver", choices=["wrk", "httpx"], default="wrk",
                    help="load generator: wrk (C, apt-get install wrk) or httpx (Python; client-bound on 2 cores)")
    ap.add_argument("--seconds", type=int, default=15, help="wrk duration per configuration")
    ap.add_argument("--compare-ref", default="", help="also run the rewardkit server at this git commit (a worktree), "
                    "between two runs of the current code, and write bench/results/serving_compare.json")
    args = ap.parse_args()
    peak = matmul_peak_gflops()
    print(f"matmul peak (fp32, 2048^3): {peak:.1f} GFLOP/s")
    from rewardkit.core.testing import make_tiny_reward_model

    tmp = Path(tempfile.mkdtemp(prefix="rk-bench-"))
    tiny = str(make_tiny_reward_model(tmp / "tiny", arch="llama", hidden=64, layers=2))
    p, k = (8, 4) if args.quick else (16, 8)
    ref_env = ref_tree(args.compare_ref, tmp) if args.compare_ref else None
    rows = run_model("tiny", tiny, grpo_workload(p * 4, k, (40, 250), (10, 150)), args.concurrency, peak, tmp,
                     args.driver, args.seconds, ref_env, args.compare_ref)
    if not args.skip_smollm2:
        p2 = 4 if args.quick else 8
        rows += run_model("smollm2", None, grpo_workload(p2, 4, (40, 250), (10, 150), seed=1), args.concurrency, peak,
                         tmp, args.driver, args.seconds * 2, ref_env, args.compare_ref)
    out = "serving_compare.json" if args.compare_ref else "serving.json"
    write_json(ROOT / "bench/results" / out, {"matmul_peak_gflops": peak, "rows": rows, "concurrency": args.concurrency,
                                              "compare_ref": args.compare_ref or None})
    if args.compare_ref:
        import subprocess

        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / f"ref-{args.compare_ref}")],
                       check=False, capture_output=True)


if __name__ == "__main__":
    main()
