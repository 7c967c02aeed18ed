"""Headroom, part 2 (issue 14): does a head that also sees the base LM's log-likelihood beat the log-likelihood?

The headroom study (``bench/headroom.py``) found that no frozen linear read-out beats the base LM's mean per-token
log-likelihood (LL) on the pairs written outside the testbed, and that the two fail in opposite directions on unseen
styles (the LL prefers plain text, the heads prefer styled text). This script asks whether a combination does better
than either, before anything is built into the server. On the same cached features, fixed evaluation sets and
seeds as the headroom study:

* ``head``: the headroom study's BT head on one read-out (the control, refitted here);
* ``head+ll``: the same head with the standardised LL as one more feature (its weight fitted with the rest);
* ``ll+residual``: reward = LL + w . h, the LL weight fixed at 1 and a BT head fitted on the residual (a head that
  corrects the LM instead of replacing it);

each on the usual training split (p_agree 0.8) and the artifact-balanced one (0.5). Goal (the issue's): beat LL by
5+ points on test_clean and outside_clean, and keep each unseen style within 10 points of clean on both sides.
McNemar exact tests against LL, pooled over seeds.

    python bench/headroom.py --out runs/headroom          # the cached features (57 min once)
    python bench/headroom_ll.py --features runs/headroom  # seconds
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from headroom import LAYERS, POSITIONS, STYLES, eval_sets, fit_bt, load_rows, mcnemar  # noqa: E402

READOUTS = ("L30|trail", "L20|mean_resp", "L12|mean_resp", "L20|last_resp", "L30|im_end")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--features", default="runs/headroom")
    ap.add_argument("--testbed", default="data/testbed")
    ap.add_argument("--testbed-bal", default="data/testbed_bal")
    ap.add_argument("--outside", default="bench/data/outside")
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--pool", type=int, default=800)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--json", default="bench/results/headroom_ll.json")
    a = ap.parse_args()
    from safetensors.torch import load_file

    t0 = time.time()
    fdir = Path(a.features)
    index = json.loads((fdir / "features_index.json").read_text())
    tensors = load_file(str(fdir / "features.safetensors"))
    pos_of = {tuple(k): i for i, k in enumerate(index)}
    H, LL = tensors["h"], tensors["ll"].double()  # (N, L, P, H) fp16, (N,)
    testbed, bal, outside = Path(a.testbed), Path(a.testbed_bal), Path(a.outside)
    # the same samples as headroom.py: same seeded draws
    pools = {"p_agree=0.8": load_rows(testbed / "train.jsonl", a.pool, "pool"),
             "p_agree=0.5": load_rows(bal / "train.jsonl", a.pool, "pool")}
    val = load_rows(testbed / "validation.jsonl", 200, "val")
    evals = eval_sets(testbed, outside, a.n_eval)

    def ix(rows: list[dict], side: str) -> torch.Tensor:
        return torch.tensor([pos_of[(r["prompt"], r[side])] for r in rows])

    def feats(rows: list[dict], li: int, pi: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        c, r = ix(rows, "chosen"), ix(rows, "rejected")
        return H[c, li, pi].double(), H[r, li, pi].double(), LL[c], LL[r]

    ll_ok = {e: (LL[ix(rows, "chosen")] > LL[ix(rows, "rejected")]).tolist() for e, rows in evals.items()}
    seeds = [int(s) for s in a.seeds.split(",")]
    res: dict = {"config": vars(a), "ll": {e: sum(v) / len(v) for e, v in ll_ok.items()}, "arms": {}}
    correct: dict = {}
    for train_name, pool in pools.items():
        for ro in READOUTS:
            layer, pos = ro.split("|")
            li, pi = LAYERS.index(int(layer[1:])), POSITIONS.index(pos)
            for arm in ("head", "head+ll", "ll+residual"):
                key = f"{train_name}|{ro}|{arm}"
                per_seed = []
                for seed in seeds:
                    tr = random.Random(f"seed:{seed}").sample(pool, a.train_pairs)
                    c, r, lc, lr_ = feats(tr, li, pi)
                    mu, sd = torch.cat([c, r]).mean(0), torch.cat([c, r]).std(0) + 1e-4
                    ll_sd = float(torch.cat([lc, lr_]).std()) + 1e-6

                    def x(h: torch.Tensor, ll: torch.Tensor, arm: str = arm, mu: torch.Tensor = mu,
                          sd: torch.Tensor = sd, ll_sd: float = ll_sd) -> torch.Tensor:
                        z = (h - mu) / sd
                        return torch.cat([z, (ll / ll_sd)[:, None]], 1) if arm == "head+ll" else z

                    vc, vr, vlc, vlr = feats(val, li, pi)
                    best = None
                    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
                        off = (lc - lr_) if arm == "ll+residual" else None
                        w = fit_bt(x(c, lc), x(r, lr_), l2, off, free=1 if arm == "head+ll" else 0)
                        vm = (x(vc, vlc) - x(vr, vlr)) @ w + ((vlc - vlr) if arm == "ll+residual" else 0)
                        acc = float((vm > 0).double().mean())
                        if best is None or acc > best[0]:
                            best = (acc, l2, w)
                    assert best is not None
                    accs = {}
                    for e, rows in evals.items():
                        ec, er, elc, elr = feats(rows, li, pi)
                        m = (x(ec, elc) - x(er, elr)) @ best[2] + ((elc - elr) if arm == "ll+residual" else 0)
                        ok = (m > 0).tolist()
                        correct[(key, seed, e)] = ok
                        accs[e] = sum(ok) / len(ok)
                    per_seed.append({"seed": seed, "l2": best[1], "val": best[0], "acc": accs,
                                     "ll_weight": float(best[2][-1]) if arm == "head+ll" else None})
                mean = {e: sum(s["acc"][e] for s in per_seed) / len(per_seed) for e in evals}
                tests = {e: mcnemar([v for s in seeds for v in correct[(key, s, e)]], ll_ok[e] * len(seeds))
                         for e in ("test_clean", "outside_clean")}
                res["arms"][key] = {"mean": mean, "seeds": per_seed, "mcnemar_vs_ll": tests}
                print(f"{key:<40} clean {mean['test_clean']:.3f} outside {mean['outside_clean']:.3f} "
                      f"(LL {res['ll']['test_clean']:.3f} / {res['ll']['outside_clean']:.3f}) "
                      f"p={tests['test_clean']['p']:.2g}/{tests['outside_clean']['p']:.2g}  styles w/r " +
                      " ".join(f"{mean[f'outside_{s}_on_wrong']:.2f}/{mean[f'outside_{s}_on_right']:.2f}"
                               for s in STYLES), file=sys.stderr)
    res["wall_s"] = round(time.time() - t0, 1)
    Path(a.json).write_text(json.dumps(res, indent=1, sort_keys=True))
    print(f"wrote {a.json} in {res['wall_s']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
