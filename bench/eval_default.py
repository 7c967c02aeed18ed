"""A candidate default model against the base LM's mean log-likelihood and the current default head (issue 14 goals).

Same fixed evaluation sets as ``bench/headroom.py`` (testbed test/clean/flip splits, 200 pairs each with the same
seeded sample; the 245 pairs written outside the testbed; the six unseen styles on the wrong and on the right answer,
120 pairs each). The base LM's per-pair log-likelihood choice and the current default head's choice are read from the
headroom run's cached features (``--headroom runs/headroom``, computed here for the evaluation texts when absent: fp16 hidden states, so the current head's margins are
rounded; its accuracies match ``rewardkit eval`` to within a pair or two). The candidate is scored through the
server's own Formatter and Scorer.

    python bench/eval_default.py --model runs/lora_bal --name lora_bal --json bench/results/default_candidate.json

Goals (issue 14): beat the LL margin by 5+ points on test_clean and outside_clean; each unseen style on the wrong
answer within 10 points of the clean accuracy, and on the right answer within 10 points too.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from headroom import LAYERS, POSITIONS, STYLES, eval_sets, featurize, mcnemar  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--testbed", default="data/testbed")
    ap.add_argument("--outside", default="bench/data/outside")
    ap.add_argument("--headroom", default="runs/headroom")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--json", default="bench/results/default_candidate.json")
    ap.add_argument("--smoke", action="store_true", help="every set capped at 6 pairs (checks the script, no result)")
    a = ap.parse_args()
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import DEFAULT_HEAD_DIR, load_reward_model
    from rewardkit.core.scoring import Scorer

    t0 = time.time()
    evals = eval_sets(Path(a.testbed), Path(a.outside), a.n_eval)
    if a.smoke:
        evals = {k: v[:6] for k, v in evals.items()}
    texts = sorted({(r["prompt"], r[k]) for rows in evals.values() for r in rows for k in ("chosen", "rejected")})
    hdir = Path(a.headroom)
    if not (hdir / "features.safetensors").exists():
        # No headroom run here: featurise the evaluation texts only, with the same code, and cache them.
        from safetensors.torch import save_file
        base = featurize(load_reward_model(None, device="cpu"), texts)
        hdir.mkdir(parents=True, exist_ok=True)
        save_file({"h": torch.stack([base[t]["h"] for t in texts]),
                   "ll": torch.tensor([base[t]["ll"] for t in texts])}, str(hdir / "features.safetensors"))
        (hdir / "features_index.json").write_text(json.dumps([list(t) for t in texts]))
        del base
    index = [tuple(k) for k in json.loads((hdir / "features_index.json").read_text())]
    feats = load_file(str(hdir / "features.safetensors"))
    pos = {k: i for i, k in enumerate(index)}
    w_default = load_file(str(DEFAULT_HEAD_DIR / "head.safetensors"))["weight"].float().squeeze(0)  # (H,)
    meta = json.loads((DEFAULT_HEAD_DIR / "rewardkit.json").read_text())
    ll = feats["ll"]
    # the committed default through its own read-out (the headroom features hold every read-out it can have)
    if meta.get("readout", "token") == "mean_response":
        h_def = feats["h"][:, LAYERS.index(meta["readout_layer"]), POSITIONS.index("mean_resp")].float()
    else:
        h_def = feats["h"][:, -1, 0].float()  # (N, H): layer 30, the trailing token = the reward token
    default_r = h_def @ w_default + float(meta.get("ll_weight", 0.0)) * ll

    rm = load_reward_model(a.model, device="cpu")
    fmt = Formatter(rm.tokenizer, max_length=1024)
    scorer = Scorer(rm, prefix_sharing=False)
    encs = [fmt.encode(ScoreItem(prompt=p, response=x)) for p, x in texts]
    order = sorted(range(len(texts)), key=lambda i: encs[i].num_tokens)
    cand: dict[tuple[str, str], float] = {}
    with tqdm(total=len(texts), unit="text", desc=f"score {a.name}") as bar:
        for s in range(0, len(order), 16):
            idx = order[s:s + 16]
            with torch.inference_mode():
                for i, sc in zip(idx, scorer.score_batch([encs[i] for i in idx]), strict=True):
                    cand[texts[i]] = float(sc.reward)
            bar.update(len(idx))

    out: dict = {"model": a.model, "name": a.name, "model_id": rm.model_id, "sets": {}, "n": {}}
    for name, rows in evals.items():
        c_ok = [cand[(r["prompt"], r["chosen"])] > cand[(r["prompt"], r["rejected"])] for r in rows]
        l_ok = [bool(ll[pos[(r["prompt"], r["chosen"])]] > ll[pos[(r["prompt"], r["rejected"])]]) for r in rows]
        d_ok = [bool(default_r[pos[(r["prompt"], r["chosen"])]] > default_r[pos[(r["prompt"], r["rejected"])]])
                for r in rows]
        out["n"][name] = len(rows)
        out["sets"][name] = {"candidate": sum(c_ok) / len(rows), "ll": sum(l_ok) / len(rows),
                             "default": sum(d_ok) / len(rows), "vs_ll": mcnemar(c_ok, l_ok),
                             "vs_default": mcnemar(c_ok, d_ok)}
    st = out["sets"]
    out["goals"] = {
        "beats_ll_by_5_test_clean": st["test_clean"]["candidate"] - st["test_clean"]["ll"] >= 0.05,
        "beats_ll_by_5_outside_clean": st["outside_clean"]["candidate"] - st["outside_clean"]["ll"] >= 0.05,
        "styles_within_10": {s: {side: abs(st[f"outside_{s}_on_{side}"]["candidate"]
                                          - st["outside_clean"]["candidate"]) <= 0.10 for side in ("wrong", "right")}
                             for s in STYLES},
    }
    out["wall_s"] = round(time.time() - t0, 1)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1, sort_keys=True))
    print(f"{'set':<34} {'candidate':>9} {'LL':>6} {'default':>7}  McNemar p vs LL / vs default")
    for name, v in st.items():
        print(f"{name:<34} {v['candidate']:>9.3f} {v['ll']:>6.3f} {v['default']:>7.3f}  "
              f"{v['vs_ll']['p']:.3g} / {v['vs_default']['p']:.3g}")
    print(json.dumps(out["goals"], indent=1))


if __name__ == "__main__":
    main()
