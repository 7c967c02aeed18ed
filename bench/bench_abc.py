"""ABC dense-reward overhead: scalar vs dense (captured row on SDPA) vs eager ``output_attentions``, same batches.

    .venv/bin/python bench/bench_abc.py                 # tiny Llama + SmolLM2-135M, 5 interleaved rounds
    .venv/bin/python bench/bench_abc.py --rounds 3 --models tiny --threads 2

For each model and batch shape (``single``: one unpadded forward per item, what the CPU server runs;
``batch8``: padded batches of 8) the three configurations run on the same encoded items, interleaved round by round
(the machine is shared and noisy); the table gives the median seconds per round and the ratio to scalar.
``dense`` includes building the vectors (``dense_rewards``); ``eager`` is a model loaded with
``attn_implementation="eager"`` run with ``output_attentions=True`` (every layer's full T x T map), the approach the
issue asks us to avoid. Writes bench/results/abc.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import ROOT, grpo_workload  # noqa: E402

from rewardkit.core import abc  # noqa: E402
from rewardkit.core.formatting import EncodedItem, Formatter, ScoreItem  # noqa: E402
from rewardkit.core.loading import RewardModel, load_reward_model  # noqa: E402
from rewardkit.core.scoring import Scorer, pad_batch, reward_indices  # noqa: E402


@torch.inference_mode()
def eager_dense(rm: RewardModel, items: Sequence[EncodedItem], padding_side: str) -> list[Any]:
    """The reference approach: eager attention, output_attentions=True, last layer's map, head mean, row, response."""
    ids, mask, pos = pad_batch(items, rm.pad_token_id, padding_side, rm.device)
    out = rm.body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, output_attentions=True)
    idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)  # (B,)
    rows = torch.arange(len(items))
    h_r = out.last_hidden_state[rows, idx]  # (B, H)
    rewards = rm.head(h_r).squeeze(-1).float()  # (B,)
    att = out.attentions[-1].mean(1)[rows, idx]  # (B, T): head mean, reward token's row
    width = ids.shape[1]
    res = []
    for i, it in enumerate(items):
        start = width - len(it.input_ids) if padding_side == "left" else 0
        keep = [start + k for k in it.response_token_indices()]
        a = att[i, keep]
        a = a / a.sum()
        r = 0.8 * a * rewards[i]
        r[-1] += 0.2 * rewards[i]
        res.append(r)
    return res


def make_runs(rm: RewardModel, eager_rm: RewardModel, encs: list[EncodedItem], batch: int
              ) -> dict[str, Callable[[], None]]:
    scorer = Scorer(rm, padding_side="left", prefix_sharing=False)  # same plain path for scalar and dense
    layers = abc.resolve_layers(rm, abc.AbcOptions())
    opts = abc.AbcOptions()
    chunks = [encs[i:i + batch] for i in range(0, len(encs), batch)]

    def scalar() -> None:
        for c in chunks:
            scorer.score_batch(c)

    def dense() -> None:
        for c in chunks:
            for e, s in zip(c, scorer.score_batch(c, abc_layers=layers), strict=True):
                abc.dense_rewards(e, s, opts)

    def eager() -> None:
        for c in chunks:
            eager_dense(eager_rm, c, "left")

    return {"scalar": scalar, "dense": dense, "eager": eager}


def bench_model(name: str, spec: str | None, n_prompts: int, k: int, prompt_words: tuple[int, int],
                completion_words: tuple[int, int], rounds: int) -> list[dict[str, Any]]:
    rm = load_reward_model(spec, device="cpu")
    eager_rm = load_reward_model(spec, device="cpu", attn_implementation="eager")
    fmt = Formatter(rm.tokenizer, max_length=2048)
    pairs = grpo_workload(n_prompts, k, prompt_words, completion_words, seed=1)
    encs = [fmt.encode(ScoreItem(prompt=p, response=c), i) for i, (p, c) in enumerate(pairs)]
    tokens = sum(e.num_tokens for e in encs)
    rows = []
    for shape, batch in (("single", 1), ("batch8", 8)):
        runs = make_runs(rm, eager_rm, encs, batch)
        for f in runs.values():  # warm-up
            f()
        times: dict[str, list[float]] = {c: [] for c in runs}
        for r in range(rounds):
            order = list(runs) if r % 2 == 0 else list(reversed(runs))  # interleaved, alternating order
            for c in order:
                t = time.perf_counter()
                runs[c]()
                times[c].append(time.perf_counter() - t)
        med = {c: statistics.median(v) for c, v in times.items()}
        for c in runs:
            rows.append({"model": name, "shape": shape, "config": c, "items": len(encs), "tokens": tokens,
                         "median_s": med[c], "tokens_per_s": tokens / med[c], "ratio_to_scalar": med[c] / med["scalar"],
                         "runs_s": times[c]})
    return rows


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per configuration (median reported)")
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of: tiny, smollm2")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on the shared 2-core machine, 2 OMP threads under contention swung 20x)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "abc.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    wanted = args.models.split(",")
    if "tiny" in wanted:
        from rewardkit.core.testing import make_tiny_reward_model

        with tempfile.TemporaryDirectory() as tmp:
            path = make_tiny_reward_model(Path(tmp) / "tiny", arch="llama")
            rows += bench_model("tiny-llama", str(path), 8, 8, (20, 120), (10, 150), args.rounds)
    if "smollm2" in wanted:
        rows += bench_model("smollm2-135m", None, 2, 4, (20, 120), (10, 150), args.rounds)
    print(f"{'model':<14}{'shape':<8}{'config':<8}{'items':>6}{'tokens':>8}{'median s':>10}{'tok/s':>10}{'x scalar':>10}")
    for r in rows:
        print(f"{r['model']:<14}{r['shape']:<8}{r['config']:<8}{r['items']:>6}{r['tokens']:>8}{r['median_s']:>10.3f}"
              f"{r['tokens_per_s']:>10.0f}{r['ratio_to_scalar']:>10.3f}")
    write_json_atomic(args.out, {"rounds": args.rounds, "torch_threads": torch.get_num_threads(),
                                 "command": "python bench/bench_abc.py " + " ".join(sys.argv[1:]), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
