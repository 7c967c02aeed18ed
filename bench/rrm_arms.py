"""Issue 20, part 1: RRM redone with controls, on the default model's recipe (frozen SmolLM2, the mean of layer-12
states over the response plus the LM's own mean log-likelihood, ridge 0.1), 3 seeds.

Goal (stated before the run): on the artifact-biased testbed (artifacts agree with the label 80% of the time), does
RRM's augmentation lift the artifact-flip splits by 10+ points over BT without losing more than 2 points in
distribution (test) and on clean pairs, with relevance (own response beats a borrowed one) >= 0.90? Arms, all with
the same 1,000 optimiser steps of batch 100 and the same 500 training pairs per seed:

* ``bt``        BT on data/testbed (the control);
* ``rrm_f1``    RRM, BT-filtered (tau 0.2), subsampled to one augmented comparison per pair (1:1);
* ``rrm_u1``    RRM unfiltered (tau 0) at 1:1;
* ``rrm_full``  RRM filtered at the full ratio (every kept comparison, up to 14:1);
* ``ceiling``   BT on data/testbed_bal (p_agree 0.5: the artifacts carry no label; this is the default's recipe).

Evaluation: every arm is a linear head (plus ll_weight) on the same frozen features, so the evaluation texts go
through the backbone once (``extract_features`` of the shipped default model: the training code's own read-out,
cached under data/feature-cache) and each arm's reward is ``h @ w + ll_weight * ll``. A parity check compares that
with the server's Scorer on a few texts. Sets: the fixed 200-pair samples of bench/headroom.py (test, test_clean,
the three flip splits), the 245 outside pairs and the six unseen styles on the wrong and on the right answer, plus
relevance on the test_clean sample (each prompt's chosen response vs a borrowed chosen one, partners seeded as
``rewardkit eval --relevance``). Paired tests: McNemar of each arm against ``bt``, discordant counts pooled over
seeds (the same seed's arms share their training pairs).

    nohup .venv/bin/python bench/rrm_arms.py > runs/rrm_arms.log 2>&1 &     # resumable: trained arms are skipped
    .venv/bin/python bench/rrm_arms.py --seeds 0 --smoke                    # a few steps on 24 pairs: checks only

Writes bench/results/rrm_arms.json (after each seed, so a cut-off run keeps what it finished).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from headroom import STYLES, eval_sets, mcnemar  # noqa: E402

ARMS = {
    "bt": ("bt", {}),
    "rrm_f1": ("rrm", {"tau": 0.2, "augment_ratio": 1.0}),
    "rrm_u1": ("rrm", {"tau": 0.0, "augment_ratio": 1.0}),
    "rrm_full": ("rrm", {"tau": 0.2, "augment_ratio": 0.0}),
    "ceiling": ("bt", {"train_file": "data/testbed_bal"}),
}
FLIPS = ("test_flip_length", "test_flip_boilerplate", "test_flip_format")


def recipe(seed: int, out: Path, smoke: bool) -> dict:
    from rewardkit.training.reproduce_default import DEFAULT_HEAD_RECIPE

    r = {k: v for k, v in DEFAULT_HEAD_RECIPE.items() if k not in ("model_id", "description")}
    r.update(train_file="data/testbed", seed=seed, output_dir=str(out), max_steps=1000, disable_tqdm=True)
    if smoke:
        r.update(max_train_pairs=24, max_steps=5, batch_size=8)
    return r


def train_arm(arm: str, seed: int, root: Path, smoke: bool) -> dict:
    from rewardkit.training.bt import train_bt
    from rewardkit.training.config import BTConfig, RRMConfig
    from rewardkit.training.rrm import train_rrm

    out = root / f"{arm}_s{seed}"
    if (out / "rewardkit.json").is_file():
        return json.loads((out / "train_result.json").read_text()) if (out / "train_result.json").is_file() else {}
    kind, extra = ARMS[arm]
    cfg = {**recipe(seed, out, smoke), **extra}
    t = time.time()
    res = (train_bt(BTConfig(**cfg)) if kind == "bt" else train_rrm(RRMConfig(**cfg)))
    info = {"arm": arm, "seed": seed, "wall_s": round(time.time() - t, 1), "steps": res.steps,
            "train_accuracy": res.metrics.get("train_accuracy"),
            "train_comparisons": res.metrics.get("train_comparisons"),
            "augmentation": res.metrics.get("augmentation")}
    (out / "train_result.json").write_text(json.dumps(info, indent=1))
    print(f"trained {arm} seed {seed} in {info['wall_s']} s: {info}", flush=True)
    return info


def eval_features(evals: dict[str, list[dict]], smoke: bool) -> tuple[dict, torch.Tensor, list]:
    """(prompt, response) -> row of the (N, H + 1) feature matrix, through the training code's extractor."""
    from rewardkit.core.formatting import Formatter
    from rewardkit.core.loading import load_reward_model
    from rewardkit.training.data import PreferencePair
    from rewardkit.training.features import EncodedPair, extract_features, to_score_item
    from rewardkit.training.partners import draw_partners

    clean = evals["test_clean"]
    partner, _ = draw_partners(len(clean), seed=0)
    evals["relevance"] = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": clean[partner[i]]["chosen"]}
                          for i, r in enumerate(clean)]
    texts = sorted({(r["prompt"], r[k]) for rows in evals.values() for r in rows for k in ("chosen", "rejected")})
    rm = load_reward_model(None, device="cpu")  # the shipped default: L12 mean_response read-out
    fmt = Formatter(rm.tokenizer, max_length=1024)
    # pseudo-pairs of consecutive texts, so the pair extractor (and its cache) serve single texts
    half = (len(texts) + 1) // 2
    padded = texts + texts[:1] * (2 * half - len(texts))
    items = [fmt.encode(to_score_item(p, x), index=i, truncate=True) for i, (p, x) in enumerate(padded)]
    enc = [EncodedPair(pair=PreferencePair(prompt=padded[2 * i][0], chosen=padded[2 * i][1],
                                           rejected=padded[2 * i + 1][1]),
                       chosen=items[2 * i], rejected=items[2 * i + 1], index=i) for i in range(half)]
    h_c, h_r = extract_features(rm, enc, cache_dir=None if smoke else "data/feature-cache", with_ll=True)
    feats = torch.stack([h_c, h_r], dim=1).reshape(2 * half, -1)[:len(texts)]  # (N, H + 1)
    return {t: i for i, t in enumerate(texts)}, feats, [rm, fmt]


def arm_rewards(path: Path, feats: torch.Tensor) -> torch.Tensor:
    from safetensors.torch import load_file

    meta = json.loads((path / "rewardkit.json").read_text())
    w = load_file(str(path / "head.safetensors"))["weight"].float().squeeze(0)  # (H,)
    assert meta.get("readout") == "mean_response" and meta.get("readout_layer") == 12, meta
    return feats[:, :-1] @ w + float(meta.get("ll_weight", 0.0)) * feats[:, -1]


def parity(path: Path, pos: dict, feats: torch.Tensor, tools: list) -> float:
    """Largest |feature-based raw reward - the server Scorer's raw reward| over 8 evaluation texts."""
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model
    from rewardkit.core.scoring import Scorer

    rm = load_reward_model(path, device="cpu")
    texts = list(pos)[:: max(1, len(pos) // 8)][:8]
    fmt = Formatter(rm.tokenizer, max_length=1024)
    served = [s.raw_reward for s in Scorer(rm, prefix_sharing=False).score_batch(
        [fmt.encode(ScoreItem(prompt=p, response=x), index=i) for i, (p, x) in enumerate(texts)])]
    ours = arm_rewards(path, feats)[[pos[t] for t in texts]]
    return float(max(abs(a - float(b)) for a, b in zip(served, ours, strict=True)))


def evaluate(root: Path, seeds: list[int], evals: dict, pos: dict, feats: torch.Tensor, tools: list,
             train_info: dict, wall: float) -> dict:
    ll = feats[:, -1]
    oks: dict[str, dict[int, dict[str, list[bool]]]] = {}
    for arm in ARMS:
        for s in seeds:
            p = root / f"{arm}_s{s}"
            if not (p / "rewardkit.json").is_file():
                continue
            r = arm_rewards(p, feats)
            oks.setdefault(arm, {})[s] = {
                name: [bool(r[pos[(x["prompt"], x["chosen"])]] > r[pos[(x["prompt"], x["rejected"])]]) for x in rows]
                for name, rows in evals.items()}
    ll_ok = {name: [bool(ll[pos[(x["prompt"], x["chosen"])]] > ll[pos[(x["prompt"], x["rejected"])]]) for x in rows]
             for name, rows in evals.items()}
    out: dict = {"seeds": seeds, "n": {k: len(v) for k, v in evals.items()}, "train": train_info, "arms": {},
                 "ll": {k: sum(v) / len(v) for k, v in ll_ok.items()}, "wall_s": round(wall, 1)}
    for arm, by_seed in oks.items():
        res = {}
        for name in evals:
            accs = [sum(by_seed[s][name]) / len(by_seed[s][name]) for s in sorted(by_seed)]
            a = b = 0
            for s in by_seed:
                if s in oks.get("bt", {}):
                    m = mcnemar(by_seed[s][name], oks["bt"][s][name])
                    a, b = a + m["a_only"], b + m["b_only"]
            from default_seeds import exact_p

            res[name] = {"mean": statistics.mean(accs), "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                         "seeds": accs, "pooled_vs_bt": {"a_only": a, "b_only": b, "p": exact_p(a, b)}}
        out["arms"][arm] = res
    if "bt" in out["arms"]:
        bt = out["arms"]["bt"]
        out["goals"] = {arm: {
            "flips_ge_bt_plus_10": {f: v[f]["mean"] - bt[f]["mean"] >= 0.10 for f in FLIPS},
            "test_ge_bt_minus_2": v["test"]["mean"] - bt["test"]["mean"] >= -0.02,
            "clean_ge_bt_minus_2": v["test_clean"]["mean"] - bt["test_clean"]["mean"] >= -0.02,
            "relevance_ge_0.90": v["relevance"]["mean"] >= 0.90,
            "styles_within_10": {st: {side: abs(v[f"outside_{st}_on_{side}"]["mean"] - v["outside_clean"]["mean"])
                                      <= 0.10 for side in ("wrong", "right")} for st in STYLES},
        } for arm, v in out["arms"].items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--root", default="runs/rrm_arms")
    ap.add_argument("--json", default="bench/results/rrm_arms.json")
    ap.add_argument("--smoke", action="store_true", help="24 pairs, 5 steps, 6 pairs per set: checks the script only")
    a = ap.parse_args()
    t0 = time.time()
    seeds = [int(s) for s in a.seeds.split(",")]
    root = Path(a.root + ("_smoke" if a.smoke else ""))
    evals = eval_sets(Path("data/testbed"), Path("bench/data/outside"), 200)
    if a.smoke:
        evals = {k: v[:6] for k, v in evals.items()}
    pos = feats = tools = None
    train_info: dict = {}
    for s in seeds:
        for arm in ARMS:
            train_info[f"{arm}_s{s}"] = train_arm(arm, s, root, a.smoke)
        if pos is None:
            pos, feats, tools = eval_features(evals, a.smoke)
            gap = parity(root / f"ceiling_s{s}", pos, feats, tools)
            print(f"parity: feature-based vs served raw reward, max |diff| = {gap:.2e}", flush=True)
            assert gap < 1e-2, f"feature-based rewards differ from the server's by {gap}"
        out = evaluate(root, [x for x in seeds if x <= s], evals, pos, feats, tools, train_info, time.time() - t0)
        out["parity_max_abs_diff"] = gap
        if not a.smoke:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(out, indent=1, sort_keys=True))
        print(f"after seed {s} ({time.time() - t0:.0f} s):", flush=True)
        names = ["test", "test_clean", *FLIPS, "relevance", "outside_clean"]
        print(f"{'arm':<10}" + "".join(f"{n[-12:]:>13}" for n in names), flush=True)
        for arm, v in out["arms"].items():
            print(f"{arm:<10}" + "".join(f"{v[n]['mean']:>13.3f}" for n in names), flush=True)
        print(f"{'LL':<10}" + "".join(f"{out['ll'][n]:>13.3f}" for n in names), flush=True)


if __name__ == "__main__":
    main()
