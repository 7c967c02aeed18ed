"""BT vs RRM vs Id-RM on the testbed, same budget and seeds (docs/results.md, "Robust training").

    python bench/bench_robust.py --testbed data/testbed --out runs/robust --seeds 0,1,2 --methods bt,rrm
    python bench/bench_robust.py --testbed data/testbed --out runs/robust --seeds 0 --methods bt_lora,idrm

``bt`` and ``rrm`` train frozen-backbone heads (``rewardkit train bt`` / ``rewardkit train rrm`` with the flags printed
in the JSON); ``bt_lora`` and ``idrm`` fine-tune LoRA adapters on the last K layers' attention starting from the seed's
frozen BT checkpoint (``idrm`` with ``eta=0`` is exactly ``bt_lora``: the only difference is the KL term).
``rrm_lora`` (BT-filtered, tau) and ``rrm_lora_u1`` (unfiltered) train RRM's augmented comparisons, subsampled to one
per pair (1:1), on the same LoRA placement, start, learning rate and number of optimiser steps as ``bt_lora``; the
seed's frozen BT checkpoint is also the filter's baseline.

Evaluation reads the reward-token hidden states through the BT trainer's feature extractor with a cache keyed by the
backbone weights and token ids, so every frozen head shares one backbone pass per split; a LoRA model's merged
backbone has other weights and gets its own pass. Accuracy equals the server's (features come from its Scorer).
Prints a table (mean, spread over seeds) and the time of each trainer relative to BT; writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

SPLITS = ("test", "test_clean", "test_flip_length", "test_flip_boilerplate", "test_flip_format", "test_late_evidence")
PROBE = (0.0, 0.2, 0.4, 0.6, 0.8)


def _recipe(args: argparse.Namespace, seed: int, out: Path) -> dict[str, Any]:
    return {"model": "embedded", "mode": "frozen", "train_file": args.testbed, "max_train_pairs": args.train_pairs,
            "max_length": 1024, "learning_rate": 3e-3, "weight_decay": 0.01, "num_epochs": args.epochs,
            "batch_size": 32, "warmup_ratio": 0.05, "center_rewards_coefficient": 0.01, "seed": seed,
            "output_dir": str(out), "feature_cache_dir": args.cache, "disable_tqdm": True, "logging_steps": 50}


def _flags(cfg: dict[str, Any]) -> str:
    return " ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else (f"--{k.replace('_', '-')}" if v
                    else "") for k, v in cfg.items()).strip()


def lora_steps(args: argparse.Namespace) -> int:
    """The optimiser steps of ``bt_lora`` (batch 8 over ``--lora-pairs`` for ``--lora-epochs``): RRM's LoRA arms
    train exactly as many, so their 1:1 set (two comparisons per pair) is seen for half the epochs."""
    return max(1, math.ceil(math.ceil(args.lora_pairs / 8) * args.lora_epochs))


def _lora_start(args: argparse.Namespace, seed: int, base: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """The seed's frozen BT checkpoint (trained if missing) and the LoRA settings every LoRA arm shares."""
    start = Path(args.out) / f"bt-s{seed}"
    if not (start / "rewardkit.json").is_file():
        train("bt", args, seed)
    return start, {**base, "model": str(start), "mode": "lora", "max_train_pairs": args.lora_pairs,
                   "num_epochs": args.lora_epochs, "learning_rate": args.lora_lr, "batch_size": 8,
                   "feature_cache_dir": "", **({"lora_layers": args.lora_layers} if args.lora_layers else {}),
                   **({"lora_target_modules": args.lora_targets} if args.lora_targets else {})}


def train(method: str, args: argparse.Namespace, seed: int) -> tuple[Path, dict[str, Any], str]:
    out = Path(args.out) / f"{method}-s{seed}"
    base = _recipe(args, seed, out)
    t0 = time.time()
    if method == "bt":
        from rewardkit.training.bt import train_bt
        from rewardkit.training.config import BTConfig

        cmd = "rewardkit train bt " + _flags(base)
        metrics = train_bt(BTConfig(**base), command=cmd).metrics
    elif method == "rrm":
        from rewardkit.training.rrm import RRMConfig, train_rrm

        cfg = {**base, "tau": args.tau}
        cmd = "rewardkit train rrm " + _flags(cfg)
        metrics = train_rrm(RRMConfig(**cfg), command=cmd).metrics
    elif method in ("rrm_lora", "rrm_lora_u1"):  # RRM at 1:1 on the same LoRA placement and steps as bt_lora
        from rewardkit.training.rrm import RRMConfig, train_rrm

        start, lora = _lora_start(args, seed, base)
        cfg = {**lora,
               "max_steps": lora_steps(args), "logging_steps": 5, "baseline_model": str(start),
               "tau": 0.0 if method == "rrm_lora_u1" else args.tau, "augment_ratio": 1.0,
               }
        cmd = "rewardkit train rrm " + _flags(cfg)
        metrics = train_rrm(RRMConfig(**cfg), command=cmd).metrics
    elif method in ("bt_lora", "idrm", "idrm_shuffled", "idrm_uniform"):
        from rewardkit.training.idrm import IdRMConfig, train_idrm

        start, lora = _lora_start(args, seed, base)
        cfg = {**lora,
               "eta": 0.0 if method == "bt_lora" else args.eta, "align_layers": args.k,
               "teacher_epochs": args.teacher_epochs, "teacher_cache_dir": args.cache, "logging_steps": 5,
               "align_queries": args.align_queries, "mass_weight": args.mass_weight,
               "teacher_pairs": args.teacher_pairs, "teacher_val_pairs": args.teacher_val_pairs,
               "teacher_exclude": args.train_pairs if args.teacher_pairs else 0,
               "teacher_min_gain": args.teacher_min_gain,
               "target_control": {"idrm_shuffled": "shuffled", "idrm_uniform": "uniform"}.get(method, "teacher"),
               }
        cmd = "rewardkit train idrm " + _flags(cfg)
        metrics = train_idrm(IdRMConfig(**cfg), command=cmd).metrics
    else:
        raise ValueError(f"unknown method {method!r}")
    metrics["wall_seconds"] = round(time.time() - t0, 1)
    return out, metrics, cmd


def relevance_pairs(pairs: list[Any]) -> list[Any]:
    """Relevance pairs from preference pairs: prompt i's chosen response is "chosen", the chosen response of a seeded
    partner prompt (never i) is "rejected" (``rewardkit eval --relevance`` and bench/rrm_arms.py draw them alike)."""
    from rewardkit.training.data import PreferencePair
    from rewardkit.training.partners import draw_partners

    partner, _ = draw_partners(len(pairs), seed=0)
    return [PreferencePair(prompt=p.prompt, chosen=p.chosen, rejected=pairs[partner[i]].chosen)
            for i, p in enumerate(pairs)]


def evaluate_ckpt(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    from rewardkit.core.formatting import Formatter
    from rewardkit.core.loading import load_reward_model
    from rewardkit.training.data import load_preferences
    from rewardkit.training.eval import mask_item, probe_tokens
    from rewardkit.training.features import encode_pairs, extract_features

    rm = load_reward_model(path, device="cpu", dtype="float32")
    w = rm.head.weight.detach().float().squeeze(0)  # (H,)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    res: dict[str, Any] = {}
    files = [(split, Path(args.testbed) / f"{split}.jsonl", args.eval_pairs) for split in args.splits.split(",")]
    if args.relevance:  # RRM's goal (issue 20): on the test_clean sample, as bench/rrm_arms.py measures it
        files.append(("relevance", Path(args.testbed) / "test_clean.jsonl", args.eval_pairs))
    if args.outside:  # the outside pairs and the unseen styles (bench/outside_pairs.py)
        files += [(f"outside_{f.stem}", f, args.outside_pairs) for f in sorted(Path(args.outside).glob("*.jsonl"))]
    for split, file, n_eval in files:
        pairs, _ = load_preferences(file)
        if n_eval and n_eval < len(pairs):
            key = "test_clean" if split == "relevance" else split  # relevance: the test_clean sample's prompts
            pairs = random.Random(f"rewardkit-eval:{key}").sample(pairs, n_eval)  # eval.py's sample rule
        if split == "relevance":  # each prompt's own chosen response against one borrowed from another prompt
            pairs = relevance_pairs(pairs)
        enc, _ = encode_pairs(pairs, fmt)
        h_c, h_r = extract_features(rm, enc, cache_dir=args.cache, progress=False)
        d = h_c @ w - h_r @ w  # (N,)
        res[split] = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
        if args.save_margins:  # per-pair reward margins, for paired comparisons between methods on the same pairs
            res[f"{split}_margins"] = [round(float(x), 5) for x in d]
        if split == "test" and args.probe_pairs:
            sub = enc[:args.probe_pairs]
            probe = {}
            for f in PROBE:
                m = [dataclasses.replace(  # content tokens only: the chat template is never hidden (eval.py)
                    ep, chosen=mask_item(ep.chosen, f, rm.pad_token_id, "replace",
                                         probe_tokens(ep.chosen, ep.pair, "chosen", "content")),
                    rejected=mask_item(ep.rejected, f, rm.pad_token_id, "replace",
                                       probe_tokens(ep.rejected, ep.pair, "rejected", "content"))) for ep in sub]
                mc, mr = extract_features(rm, m, cache_dir=args.cache, progress=False)
                dm = mc @ w - mr @ w
                probe[f"{f:.1f}"] = float(((dm > 0).float() + 0.5 * (dm == 0).float()).mean())
            res["probe"] = probe
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--testbed", default="data/testbed")
    p.add_argument("--out", default="runs/robust")
    p.add_argument("--cache", default="data/robust-cache", help="feature and teacher cache")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="bt,rrm")
    p.add_argument("--train-pairs", type=int, default=300)
    p.add_argument("--epochs", type=float, default=30.0)
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--eval-pairs", type=int, default=150, help="seeded sample per split (0 = all)")
    p.add_argument("--probe-pairs", type=int, default=100, help="masking probe on the first N sampled test pairs")
    p.add_argument("--lora-pairs", type=int, default=200)
    p.add_argument("--lora-epochs", type=float, default=1.0)
    p.add_argument("--lora-lr", type=float, default=2e-4)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--lora-layers", default="", help="layers LoRA adapts, e.g. 14-29 or 26,27 (default: the last K)")
    p.add_argument("--teacher-epochs", type=float, default=2.0)
    p.add_argument("--teacher-pairs", type=int, default=0,
                   help="pairs the teacher fine-tunes on, disjoint from the student's (0 = the student's own)")
    p.add_argument("--teacher-val-pairs", type=int, default=0, help="held-out check of the teacher (0 = none)")
    p.add_argument("--teacher-min-gain", type=float, default=0.10)
    p.add_argument("--align-queries", type=int, default=0, help="response rows aligned per text (0 = reward row only)")
    p.add_argument("--mass-weight", type=float, default=0.0, help="weight of the attention-mass term (0 = off)")
    p.add_argument("--lora-targets", default="", help="LoRA target modules (default: the trainer's q,k,v,o)")
    p.add_argument("--outside", default="", help="also evaluate the outside pairs and unseen styles in this dir "
                   "(bench/data/outside): outside_clean and outside_<style>_on_<side>")
    p.add_argument("--outside-pairs", type=int, default=0, help="seeded sample per outside file (0 = all)")
    p.add_argument("--splits", default=",".join(SPLITS), help="testbed splits to evaluate")
    p.add_argument("--relevance", action="store_true", help="also evaluate relevance: on the test_clean sample, "
                   "each prompt's own chosen response against a borrowed one (RRM's goal: >= 0.90)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--json", default="", help="append results to this JSON file (default OUT/results.json)")
    p.add_argument("--eval-only", action="store_true",
                   help="evaluate the checkpoints already in OUT/METHOD-sSEED (no training); results go to --json")
    p.add_argument("--save-margins", action="store_true", help="store each evaluated pair's reward margin")
    p.add_argument("--paired", default="", help="with --report and stored margins: METHOD_A,METHOD_B pair counts")
    p.add_argument("--report", default="", help="print the table of this results JSON and exit (no training)")
    args = p.parse_args(argv)
    if "-" in args.lora_layers:  # a range a-b -> "a,...,b", as rewardkit train idrm --lora-layers takes it
        lo, hi = (int(x) for x in args.lora_layers.split("-"))
        args.lora_layers = ",".join(str(i) for i in range(lo, hi + 1))
    if args.report:
        done = json.loads(Path(args.report).read_text())
        print(table(done))
        if args.paired:
            print(paired(done, *args.paired.split(",")))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    out_json = Path(args.json or Path(args.out) / ("results-eval.json" if args.eval_only else "results.json"))
    runs: list[dict[str, Any]] = json.loads(out_json.read_text()) if out_json.is_file() else []
    made = Path(args.out) / "results.json"
    trained: list[dict[str, Any]] = json.loads(made.read_text()) if args.eval_only and made.is_file() else []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for method in args.methods.split(","):
            if args.eval_only:  # the training record comes from the run that made the checkpoint
                path = Path(args.out) / f"{method}-s{seed}"
                src = [r for r in trained if r["method"] == method and r["seed"] == seed]
                metrics, cmd = (src[0]["metrics"], src[0]["command"]) if src else ({"wall_seconds": 0.0}, "")
            else:
                try:
                    path, metrics, cmd = train(method, args, seed)
                except ValueError as e:  # a teacher refused by its held-out check is a result, not a crash
                    if "teacher_min_gain" not in str(e):
                        raise
                    runs = [r for r in runs if not (r["method"] == method and r["seed"] == seed)]
                    runs.append({"method": method, "seed": seed, "refused": str(e), "eval": {}, "metrics": {}})
                    out_json.parent.mkdir(parents=True, exist_ok=True)
                    out_json.write_text(json.dumps(runs, indent=2, sort_keys=True))
                    print(method, seed, "refused:", e, flush=True)
                    continue
            t_eval = time.time()
            ev = evaluate_ckpt(path, args)
            runs = [r for r in runs if not (r["method"] == method and r["seed"] == seed)]
            runs.append({"method": method, "seed": seed, "command": cmd, "eval": ev, "eval_seconds":
                         round(time.time() - t_eval, 1), "metrics": {k: v for k, v in metrics.items() if k != "eval"},
                         "bench_command": "python " + " ".join(sys.argv)})
            out_json.parent.mkdir(parents=True, exist_ok=True)
            out_json.write_text(json.dumps(runs, indent=2, sort_keys=True))
            print(method, seed, json.dumps(ev), f"train {metrics['wall_seconds']}s", flush=True)
    print(table(runs))
    return 0


def paired(runs: list[dict[str, Any]], a: str, b: str) -> str:
    """Per split and seed, on the same evaluated pairs: how many only A gets right, how many only B (McNemar's
    discordant pairs) and the exact two-sided sign-test p-value of the seeds' pooled counts."""
    from math import comb

    by = {(r["method"], r["seed"]): r["eval"] for r in runs}
    lines = [f"paired {a} vs {b}: split  seed: only-{a} / only-{b}  ...  pooled  p"]
    for split in _columns(runs):
        cells, wa, wb = [], 0, 0
        for seed in sorted({s for m, s in by if m == a and (b, s) in by}):
            ma, mb = by[(a, seed)].get(f"{split}_margins"), by[(b, seed)].get(f"{split}_margins")
            if not ma or not mb:
                continue
            oa = sum(1 for x, y in zip(ma, mb, strict=True) if x > 0 >= y)
            ob = sum(1 for x, y in zip(ma, mb, strict=True) if y > 0 >= x)
            wa, wb = wa + oa, wb + ob
            cells.append(f"s{seed}: {oa}/{ob}")
        if cells:
            n, k = wa + wb, min(wa, wb)
            p = min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
            lines.append(f"{split}  " + "  ".join(cells) + f"  pooled {wa}/{wb}  p={p:.3f}")
    return "\n".join(lines)


def _columns(runs: list[dict[str, Any]]) -> list[str]:
    """The evaluated sets, testbed splits first, then any others (outside pairs, styles) in the order they came."""
    seen = [k for r in runs for k, v in r["eval"].items() if isinstance(v, float)]
    return [*[s for s in SPLITS if s in seen], *dict.fromkeys(k for k in seen if k not in SPLITS)]


def table(runs: list[dict[str, Any]]) -> str:
    refused = [r for r in runs if r.get("refused")]
    runs = [r for r in runs if not r.get("refused")]
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["method"], []).append(r)
    cols = [c for c in (*_columns(runs), *(f"probe{f:.1f}" for f in PROBE))
            if all((c[5:] in r["eval"].get("probe", {})) if c.startswith("probe") else c in r["eval"] for r in runs)]
    lines = ["method  seeds  " + "  ".join(cols) + "  train_s  s_per_epoch"]
    for m, rs in by.items():
        cells = []
        for c in cols:
            vals = [r["eval"]["probe"][c[5:]] if c.startswith("probe") else r["eval"][c] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{100 * statistics.mean(vals):.1f}±{100 * sd:.1f}")
        secs = statistics.mean(r["metrics"]["wall_seconds"] for r in rs)
        per_epoch = [r["metrics"]["seconds_per_epoch"] for r in rs if "seconds_per_epoch" in r["metrics"]]
        epoch = f"{statistics.mean(per_epoch):.1f}" if per_epoch else "-"
        lines.append(f"{m}  {len(rs)}  " + "  ".join(cells) + f"  {secs:.0f}  {epoch}")
    lines += [f"{r['method']} seed {r['seed']}: refused: {r['refused']}" for r in refused]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
