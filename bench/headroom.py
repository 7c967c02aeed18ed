"""Headroom study (issue 14): which read-out of frozen SmolLM2-135M can judge which task family?

One forward pass per unique text keeps the hidden states of layers {8, 12, 16, 20, 24, 30 (last)} at four reward
positions (``trail``: the template's trailing token, where the served default model reads; ``im_end``: the
``<|im_end|>`` before it; ``last_resp``: the response's last token; ``mean_resp``: the mean over the response's
tokens), plus the base LM's mean log-likelihood of the response tokens (the floor any RM should beat; the *mean*,
since the sum is a length artifact).

For each read-out a Bradley-Terry linear head (no bias, L2 picked on the testbed's validation split) is fitted on
``--train-pairs`` testbed train pairs, per seed (a different subsample of a fixed pool per seed), once on the usual
train split (artifacts agree with the label 80% of the time) and once on an artifact-balanced one (p_agree = 0.5,
``rewardkit testbed make --p-agree 0.5``). It is evaluated on fixed sets: testbed test / test_clean / flip splits and
the pairs written outside the testbed (``bench/outside_pairs.py``) with unseen styles on either side. McNemar tests
compare the best read-out with the log-likelihood baseline, pooled over seeds.

    python bench/outside_pairs.py
    rewardkit testbed make --out data/testbed && rewardkit testbed make --out data/testbed_bal --p-agree 0.5
    python bench/headroom.py --out runs/headroom          # ~30 min on 2 cores; features cached in --out

Resume: the per-text features are saved to ``--out/features.safetensors`` after the forward pass; a rerun with the
same ``--out`` skips the pass and only refits the heads.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

LAYERS = (8, 12, 16, 20, 24, 30)
POSITIONS = ("trail", "im_end", "last_resp", "mean_resp")
STYLES = ("enthusiasm", "emoji", "citation", "confidence", "bold", "repetition")


def load_rows(path: Path, n: int | None = None, seed: str = "") -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if n is not None and n < len(rows):
        rows = random.Random(f"headroom:{seed}:{path}").sample(rows, n)
    return rows


def eval_sets(testbed: Path, outside: Path, n_eval: int) -> dict[str, list[dict]]:
    sets = {s: load_rows(testbed / f"{s}.jsonl", n_eval, "eval") for s in
            ("test", "test_clean", "test_flip_length", "test_flip_boilerplate", "test_flip_format")}
    sets["outside_clean"] = load_rows(outside / "clean.jsonl")
    for st in STYLES:
        for side in ("wrong", "right"):
            sets[f"outside_{st}_on_{side}"] = load_rows(outside / f"{st}_on_{side}.jsonl")
    return sets


@torch.no_grad()
def featurize(rm, texts: list[tuple[str, str]], batch_tokens: int = 2048) -> dict[tuple[str, str], dict]:
    """(prompt, response) -> {"h": (L, P, H) fp16, "ll": float}. Right-padded batches of similar length."""
    from tqdm.auto import tqdm

    from rewardkit.core.formatting import Formatter, ScoreItem

    fmt = Formatter(rm.tokenizer, max_length=1024)
    encs = {t: fmt.encode(ScoreItem(prompt=t[0], response=t[1])) for t in texts}
    order = sorted(texts, key=lambda t: encs[t].num_tokens)
    body = rm.body
    emb = body.embed_tokens.weight  # (V, H): SmolLM2 ties the LM head to the embeddings
    im_end = rm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    out: dict[tuple[str, str], dict] = {}
    bar = tqdm(total=sum(e.num_tokens for e in encs.values()), unit="tok", desc="forward", dynamic_ncols=True)
    i = 0
    while i < len(order):
        n_max = encs[order[i]].num_tokens
        j = i
        while j < len(order) and (j - i + 1) * max(n_max, encs[order[j]].num_tokens) <= batch_tokens and j - i < 32:
            n_max = max(n_max, encs[order[j]].num_tokens)
            j += 1
        j = max(j, i + 1)
        batch = order[i:j]
        T = max(encs[t].num_tokens for t in batch)
        ids = torch.full((len(batch), T), rm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, t in enumerate(batch):
            e = encs[t]
            ids[b, :e.num_tokens] = torch.tensor(e.input_ids)
            mask[b, :e.num_tokens] = 1
        hs = body(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states  # L+1 x (B, T, H)
        for b, t in enumerate(batch):
            e = encs[t]
            n = e.num_tokens
            resp = e.response_token_indices() or [n - 1]
            pos = {"trail": n - 1, "im_end": n - 2 if e.input_ids[n - 2] == im_end else n - 1,
                   "last_resp": resp[-1]}
            feats = torch.zeros(len(LAYERS), len(POSITIONS), hs[0].shape[-1])
            for li, layer in enumerate(LAYERS):
                h = hs[layer][b]  # (T, H)
                for pi, p in enumerate(POSITIONS):
                    feats[li, pi] = h[resp].mean(0) if p == "mean_resp" else h[pos[p]]
            # mean log p(response token | prefix) under the base LM
            prev = torch.tensor([k - 1 for k in resp if k >= 1])
            tgt = torch.tensor([e.input_ids[k] for k in resp if k >= 1])
            logp = torch.log_softmax(hs[-1][b, prev].float() @ emb.T.float(), dim=-1)  # (R, V)
            ll = float(logp.gather(1, tgt[:, None]).mean()) if len(tgt) else 0.0
            out[t] = {"h": feats.half(), "ll": ll}
        bar.update(sum(encs[t].num_tokens for t in batch))
        i = j
    bar.close()
    return out


def fit_bt(dc: torch.Tensor, dr: torch.Tensor, l2: float, offset: torch.Tensor | None = None,
           free: int = 0) -> torch.Tensor:
    """Linear BT head w (no bias) minimising mean softplus(-(offset + (c - r) . w)) + l2 |w[:H-free]|^2;
    (N, H) x2 -> (H,). ``offset`` (N,): a fixed margin added to every pair (default 0); the last ``free`` weights
    are not penalised."""
    d = (dc - dr).double()  # (N, H)
    off = torch.zeros(d.shape[0], dtype=torch.float64) if offset is None else offset.double()
    pen = torch.ones(d.shape[1], dtype=torch.float64)
    if free:
        pen[-free:] = 0.0
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.softplus(-(off + d @ w)).mean() + l2 * (pen * w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Exact two-sided McNemar on paired correctness lists."""
    n01 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = n01 + n10
    if n == 0:
        return {"a_only": 0, "b_only": 0, "p": 1.0}
    k = min(n01, n10)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)
    return {"a_only": n01, "b_only": n10, "p": p}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", default="data/testbed")
    ap.add_argument("--testbed-bal", default="data/testbed_bal")
    ap.add_argument("--outside", default="bench/data/outside")
    ap.add_argument("--out", default="runs/headroom")
    ap.add_argument("--train-pairs", type=int, default=400)
    ap.add_argument("--pool", type=int, default=800, help="train pool each seed subsamples from")
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default="bench/results/headroom.json")
    ap.add_argument("--smoke", action="store_true", help="every set capped at 12 pairs (checks the script, no result)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from safetensors.torch import load_file, save_file

    from rewardkit.core.loading import load_reward_model

    t0 = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    testbed, bal, outside = Path(a.testbed), Path(a.testbed_bal), Path(a.outside)
    pools = {"p_agree=0.8": load_rows(testbed / "train.jsonl", a.pool, "pool"),
             "p_agree=0.5": load_rows(bal / "train.jsonl", a.pool, "pool")}
    val = load_rows(testbed / "validation.jsonl", 200, "val")
    evals = eval_sets(testbed, outside, a.n_eval)
    if a.smoke:
        pools = {k: v[:24] for k, v in pools.items()}
        val, evals = val[:12], {k: v[:12] for k, v in evals.items()}
        a.train_pairs = 12
    all_rows = [r for p in pools.values() for r in p] + val + [r for rows in evals.values() for r in rows]
    texts = sorted({(r["prompt"], r[k]) for r in all_rows for k in ("chosen", "rejected")})
    print(f"{len(texts)} unique texts; {len(all_rows)} pairs", file=sys.stderr)

    fpath = out / "features.safetensors"
    if fpath.exists() and (out / "features_index.json").exists():
        index = json.loads((out / "features_index.json").read_text())
        tensors = load_file(str(fpath))
        feats = {tuple(k): {"h": tensors["h"][i], "ll": float(tensors["ll"][i])} for i, k in enumerate(index)}
        missing = [t for t in texts if t not in feats]
        if missing:
            raise SystemExit(f"{len(missing)} texts are not in the cached features; use a new --out")
    else:
        rm = load_reward_model(None)
        feats = featurize(rm, texts)
        save_file({"h": torch.stack([feats[t]["h"] for t in texts]),
                   "ll": torch.tensor([feats[t]["ll"] for t in texts])}, str(fpath))
        (out / "features_index.json").write_text(json.dumps([list(t) for t in texts]))
    t_fwd = time.time() - t0
    print(f"features ready in {t_fwd:.0f} s", file=sys.stderr)

    def stack(rows: list[dict], li: int, pi: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = torch.stack([feats[(r["prompt"], r["chosen"])]["h"][li, pi] for r in rows]).float()
        rj = torch.stack([feats[(r["prompt"], r["rejected"])]["h"][li, pi] for r in rows]).float()
        return c, rj

    def ll_correct(rows: list[dict]) -> list[bool]:
        return [feats[(r["prompt"], r["chosen"])]["ll"] > feats[(r["prompt"], r["rejected"])]["ll"] for r in rows]

    seeds = [int(s) for s in a.seeds.split(",")]
    results: dict = {"config": vars(a), "layers": LAYERS, "positions": POSITIONS, "readouts": {},
                     "ll_baseline": {}, "n": {k: len(v) for k, v in evals.items()}}
    for name, rows in evals.items():
        results["ll_baseline"][name] = sum(ll_correct(rows)) / len(rows)
    results["ll_baseline_per_family"] = _per_family(evals["outside_clean"], ll_correct(evals["outside_clean"]))
    results["ll_baseline_per_family_test_clean"] = _per_family(evals["test_clean"], ll_correct(evals["test_clean"]))
    correct: dict = {}
    for train_name, pool in pools.items():
        for li, layer in enumerate(LAYERS):
            for pi, pos in enumerate(POSITIONS):
                key = f"{train_name}|L{layer}|{pos}"
                per_seed = []
                for seed in seeds:
                    tr = random.Random(f"seed:{seed}").sample(pool, a.train_pairs)
                    c, r = stack(tr, li, pi)
                    mu = torch.cat([c, r]).mean(0)
                    sd = torch.cat([c, r]).std(0) + 1e-4
                    vc, vr = stack(val, li, pi)
                    best = None
                    for l2 in (1e-4, 1e-3, 1e-2, 1e-1):
                        w = fit_bt((c - mu) / sd, (r - mu) / sd, l2)
                        acc = float((((vc - vr) / sd).double() @ w > 0).float().mean())
                        if best is None or acc > best[0]:
                            best = (acc, l2, w)
                    assert best is not None
                    _, l2, w = best
                    accs = {}
                    for ename, erows in evals.items():
                        ec, er = stack(erows, li, pi)
                        ok = ((((ec - er) / sd).double() @ w) > 0).tolist()
                        correct[(key, seed, ename)] = ok
                        accs[ename] = sum(ok) / len(ok)
                    accs["per_family_outside"] = _per_family(evals["outside_clean"],
                                                             correct[(key, seed, "outside_clean")])
                    per_seed.append({"seed": seed, "l2": l2, "val": best[0], "acc": accs})
                results["readouts"][key] = {
                    "mean": {e: sum(s["acc"][e] for s in per_seed) / len(per_seed) for e in evals},
                    "seeds": per_seed}
                m = results["readouts"][key]["mean"]
                print(f"{key:<32} test {m['test']:.3f} clean {m['test_clean']:.3f} outside {m['outside_clean']:.3f}",
                      file=sys.stderr)
    # best read-out per training set on outside_clean + test_clean, vs the LL baseline (McNemar pooled over seeds)
    results["best"] = {}
    for train_name in pools:
        keys = [k for k in results["readouts"] if k.startswith(train_name + "|")]
        best_key = max(keys, key=lambda k: results["readouts"][k]["mean"]["test_clean"]
                       + results["readouts"][k]["mean"]["outside_clean"])
        tests = {}
        for ename in ("test_clean", "outside_clean", "test"):
            a_ok = [x for s in seeds for x in correct[(best_key, s, ename)]]
            b_ok = ll_correct(evals[ename]) * len(seeds)
            tests[ename] = mcnemar(a_ok, b_ok)
        results["best"][train_name] = {"readout": best_key, "mean": results["readouts"][best_key]["mean"],
                                       "mcnemar_vs_ll": tests}
    results["wall_s"] = {"total": time.time() - t0, "forward": t_fwd}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=1, sort_keys=True))
    print_table(results)


def _per_family(rows: list[dict], ok: list[bool]) -> dict[str, float]:
    fam: dict[str, list[bool]] = defaultdict(list)
    for r, x in zip(rows, ok, strict=True):
        fam[r["task"]["family"]].append(x)
    return {k: sum(v) / len(v) for k, v in sorted(fam.items())}


def print_table(res: dict) -> None:
    cols = ["test", "test_clean", "test_flip_length", "test_flip_boilerplate", "test_flip_format", "outside_clean"]
    print(f"{'read-out':<32} " + " ".join(f"{c[:12]:>12}" for c in cols))
    print(f"{'base LM mean log-lik':<32} " + " ".join(f"{res['ll_baseline'][c]:>12.3f}" for c in cols))
    for k, v in res["readouts"].items():
        print(f"{k:<32} " + " ".join(f"{v['mean'][c]:>12.3f}" for c in cols))
    print()
    for train_name, b in res["best"].items():
        print(f"best ({train_name}): {b['readout']}  McNemar vs LL: " +
              ", ".join(f"{e} p={t['p']:.3g} ({t['a_only']}/{t['b_only']})" for e, t in b["mcnemar_vs_ll"].items()))
        m = b["mean"]
        print("  unseen styles (on wrong / on right): " + ", ".join(
            f"{s} {m[f'outside_{s}_on_wrong']:.2f}/{m[f'outside_{s}_on_right']:.2f}" for s in STYLES))
    print("  LL baseline styles: " + ", ".join(
        f"{s} {res['ll_baseline'][f'outside_{s}_on_wrong']:.2f}/{res['ll_baseline'][f'outside_{s}_on_right']:.2f}"
        for s in STYLES))


if __name__ == "__main__":
    main()
