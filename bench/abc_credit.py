"""Does ABC credit land on the deciding evidence? On the testbed, where each response's deciding span is known
(``answer_span``), measure the share of the attention weights a_t (ABC's credit, before beta) that falls on tokens
overlapping that span, against the share a uniform split over the response would give (span tokens / response tokens).

    .venv/bin/python bench/abc_credit.py --testbed data/testbed --split test --n 200   # default model
    .venv/bin/python bench/abc_credit.py --model DIR ...

Prints mean credit share on the evidence, the uniform share, their ratio (>1: credit concentrates on the evidence),
the fraction of responses whose evidence gets more than its uniform share, and where the rest of the mass goes (the
first and the last response token: attention sinks); ``--layer``/``--num-layers`` try other layers than the
paper's last one. Writes bench/results/abc_credit.json (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from rewardkit.core.abc import AbcOptions, dense_rewards, resolve_layers
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import Scorer


def evidence_share(spans: list[tuple[int, int]], weights: np.ndarray, ev: tuple[int, int]) -> tuple[float, float]:
    on = np.array([s < ev[1] and e > ev[0] for s, e in spans])
    if not on.any() or weights.sum() <= 0:
        return float("nan"), float("nan")
    return float(weights[on].sum() / weights.sum()), float(on.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--testbed", default="data/testbed")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=200, help="rows (each gives its chosen and rejected response)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--layer", type=int, default=-1, help="attention layer (negative: from the end)")
    ap.add_argument("--num-layers", type=int, default=1, help="average this many layers ending at --layer")
    ap.add_argument("--out", default="bench/results/abc_credit.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [json.loads(line) for line in Path(args.testbed, f"{args.split}.jsonl").open()][: args.n]
    rm = load_reward_model(args.model)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    scorer = Scorer(rm, prefix_sharing=False)
    opts = AbcOptions(layer=args.layer, num_layers=args.num_layers)
    layers = resolve_layers(rm, opts)
    shares, uniform, by_family = [], [], {}  # type: ignore[var-annotated]
    first_share, last_share = [], []
    for k, row in enumerate(rows):
        for side in ("chosen", "rejected"):
            enc = fmt.encode(ScoreItem(prompt=row["prompt"], response=row[side]))
            s = scorer.score_batch([enc], abc_layers=layers)[0]
            d = dense_rewards(enc, s, opts)
            sh, un = evidence_share(d.spans, d.weights, tuple(row["answer_span"][side]))
            if d.weights.size and d.weights.sum() > 0:
                first_share.append(float(d.weights[0] / d.weights.sum()))
                last_share.append(float(d.weights[-1] / d.weights.sum()))
            if sh == sh:  # not NaN
                shares.append(sh)
                uniform.append(un)
                by_family.setdefault(row["task"]["family"], []).append(sh / un)
        if (k + 1) % 50 == 0:
            print(f"{k + 1}/{len(rows)} rows", file=sys.stderr, flush=True)
    ratio = [a / b for a, b in zip(shares, uniform, strict=True)]
    res = {"model": rm.model_id, "trained": rm.meta.trained, "split": args.split, "responses": len(shares),
           "mean_evidence_share": statistics.mean(shares), "mean_uniform_share": statistics.mean(uniform),
           "mean_ratio": statistics.mean(ratio), "median_ratio": statistics.median(ratio),
           "frac_above_uniform": sum(r > 1 for r in ratio) / len(ratio),
           "ratio_by_family": {f: statistics.mean(v) for f, v in sorted(by_family.items())},
           "layers": list(layers), "mean_first_token_share": statistics.mean(first_share),
           "mean_last_token_share": statistics.mean(last_share),
           "command": " ".join(sys.argv)}
    print(json.dumps(res, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
