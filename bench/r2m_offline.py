"""R2M offline rounds with a real policy's states (issue 22, part 2): does the online head, fed the policy's own
last-layer states through a real server, rank the policy's right answers above its wrong ones better than the
frozen RM?

Input: the groups ``bench/r2m_policy.py --states-out`` saved (SmolLM2-135M-Instruct's K = 4 sampled answers to
testbed prompts, each with its last-layer states over the answer, captured with ``HiddenStateCapture``, and the
checker's label). Nothing here ever shows the labels to the server: GREBT trains on its own pseudo-pairs.

Protocol (fixed before the runs):

- Evaluation groups: the prompts with both a right and a wrong answer ("mixed"), split in two folds by a fixed seed
  (``--split-seed``, the same for every run). For fold A, the server is streamed every other group (fold B's
  mixed groups and all the single-label groups), round by round, and is evaluated on fold A; then the reverse.
  The two folds' pairs are pooled, so every mixed group is evaluated once, by a head that never saw it.
- Per run: a fresh ``rewardkit serve`` process (the default model, R2M on, ``--rounds`` planned rounds so w(t)
  goes from 1 to omega over the run, ``--lr``, ``--steps`` GREBT steps per update). Before each round t (and once
  after the last), the evaluation groups are scored through ``POST /v1/r2m/rewards`` (``r2m_rewards``) at round t;
  then the round's training groups go to ``/v1/r2m/feedback`` through ``FeedbackStream`` and the script waits
  until the server has applied them.
- Modes, on the same groups, rounds and seeds: ``real`` (the policy's states), ``noise`` (Gaussian of the same
  shape, each dimension at the states' own std), ``informed`` (a sanity control with a known answer: the real
  states plus +/-2 along one random unit direction for the checker's label, which a working pipeline must pick
  up), and ``frozen`` (the RM alone: the round-0 scores, where w = 1 makes the head exactly the RM; checked against
  ``/v1/rewards`` once).
- Metric: pairwise accuracy against the checker (a right answer above a wrong one of the same prompt; ties half),
  per round; the issue's number is the mean over the rounds after the first update (t >= 1). Paired test: each
  pair's correctness at the last evaluation, mode vs frozen, McNemar's discordant counts pooled over seeds, exact
  sign test.

    .venv/bin/python bench/r2m_offline.py --states runs/r2m_policy_states.npz    # ~6 min per run, 12 runs
    .venv/bin/python bench/r2m_offline.py --states ... --seeds 0 --modes real --rounds 2  # a quick look

Writes the ``offline`` part of ``bench/results/r2m_policy.json`` (other parts are kept).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import merge_json  # noqa: E402

Group = dict[str, Any]  # {"gid", "prompt", "texts", "right", "states"}


def load_groups(path: Path) -> list[Group]:
    z = np.load(path, allow_pickle=False)
    by: dict[int, Group] = {}
    for i, g in enumerate(z["groups"].tolist()):
        grp = by.setdefault(int(g), {"gid": int(g), "prompt": str(z["prompts"][i]), "texts": [], "right": [],
                                     "states": []})
        grp["texts"].append(str(z["texts"][i]))
        grp["right"].append(int(z["right"][i]))
        grp["states"].append(z[f"h{i}"].astype(np.float32))
    return [g for g in by.values() if len(g["texts"]) >= 2]  # GREBT needs a pair


def pair_outcomes(rewards: list[float], right: list[int]) -> list[float]:
    """1 / 0.5 / 0 for each (right, wrong) pair of one group, in a fixed order."""
    return [1.0 if rewards[i] > rewards[j] else 0.5 if rewards[i] == rewards[j] else 0.0
            for i in range(len(right)) for j in range(len(right)) if right[i] == 1 and right[j] == 0]


def sign_test(a: int, b: int) -> float:
    n, k = a + b, min(a, b)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0


class Feedback:
    """The states a mode sends for one answer."""

    def __init__(self, groups: list[Group], seed: int) -> None:
        allh = np.concatenate([h for g in groups for h in g["states"]])
        self.scale = allh.std(0) + 1e-6
        d = np.random.default_rng(1000 + seed).normal(size=allh.shape[1]).astype(np.float32)
        self.direction = d / np.linalg.norm(d) * float(np.sqrt((self.scale ** 2).mean()))  # one typical std
        self.rng = np.random.default_rng(seed)

    def __call__(self, h: np.ndarray, right: int, mode: str) -> np.ndarray:
        if mode == "noise":
            return (self.rng.normal(size=h.shape) * self.scale).astype(np.float32)
        if mode == "informed":
            return (h + (1.0 if right else -1.0) * 2.0 * self.direction).astype(np.float32)
        return h


def run(mode: str, seed: int, fold: int, eval_groups: list[Group], train_groups: list[Group], a: argparse.Namespace,
        tmp: Path) -> dict[str, Any]:
    """One server process: R rounds of streamed feedback, the evaluation groups scored before each round and after
    the last. Returns {"acc": [per eval], "outcomes": [per eval: per pair], "s"}."""
    import httpx

    from rewardkit.client.feedback import FeedbackStream, r2m_rewards
    from tests.helpers import ServerProcess

    t0 = time.time()
    fb = Feedback(eval_groups + train_groups, seed)
    rng = random.Random(seed * 10 + fold)
    order = train_groups[:]
    rng.shuffle(order)
    order = order[:a.train_groups] if a.train_groups else order  # a seeded subsample: the RM's forwards cost most
    rounds = [order[r::a.rounds] for r in range(a.rounds)]
    # the states each mode sends, drawn once per run so an eval group reads the same states every round
    ev_states = [[fb(h, y, mode) for h, y in zip(g["states"], g["right"], strict=True)] for g in eval_groups]
    env = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(eval_groups[0]["states"][0].shape[1]),
           "REWARDKIT_R2M_TOTAL_ROUNDS": str(a.rounds), "REWARDKIT_R2M_LR": str(a.lr),
           "REWARDKIT_R2M_STEPS_PER_UPDATE": str(a.steps), "REWARDKIT_R2M_SEED": str(seed),
           "REWARDKIT_R2M_GROUP_SIZE": "4", "OMP_NUM_THREADS": str(a.threads)}
    out: dict[str, Any] = {"mode": mode, "seed": seed, "fold": fold, "acc": [], "outcomes": [], "versions": []}
    with ServerProcess(a.model, tmp, "--max-length", "1024", env=env) as srv:
        http = httpx.Client(timeout=300)

        def evaluate(t: int) -> None:
            outcomes: list[float] = []
            version = ""
            for gi, g in enumerate(eval_groups):
                items = [{"prompt": g["prompt"], "response": r} for r in g["texts"]]
                res = r2m_rewards(srv.url, [f"ev{gi}"] * len(items), list(range(len(items))), t, ev_states[gi],
                                  items, dtype="float32")
                version = res["head_version"]
                outcomes += pair_outcomes(res["rewards"], g["right"])
                if t == 0 and gi < 3 and mode == "real":  # sanity: at w = 1 the head is the RM exactly
                    plain = http.post(srv.url + "/v1/rewards", json={"items": items}).json()["rewards"]
                    if max(abs(x - y) for x, y in zip(plain, res["rewards"], strict=True)) > 1e-4:
                        raise SystemExit(f"round-0 R2M rewards {res['rewards']} differ from /v1/rewards {plain}")
            out["acc"].append(sum(outcomes) / len(outcomes))
            out["outcomes"].append(outcomes)
            out["versions"].append(version)

        for t, part in enumerate(rounds):
            evaluate(t)
            want = http.get(srv.url + "/v1/r2m/status").json()["groups_applied"] + len(part)
            with FeedbackStream(srv.url, dtype="float32", batch_frames=32) as fs:
                for g in part:
                    for i, (h, y, text) in enumerate(zip(g["states"], g["right"], g["texts"], strict=True)):
                        fs.add(f"r{t}-g{g['gid']}", i, t, fb(h, y, mode), {"prompt": g["prompt"], "response": text},
                               group_size=len(g["texts"]))
                fs.flush(complete_groups=True)
            deadline = time.time() + 600
            while (st := http.get(srv.url + "/v1/r2m/status").json())["groups_applied"] < want:
                if time.time() > deadline:
                    raise SystemExit(f"{mode} s{seed} f{fold} round {t}: the server applied only "
                                     f"{st['groups_applied']} of {want} groups in 600 s: {st}")
                time.sleep(0.2)
            print(f"  {mode} s{seed} f{fold} round {t}: acc {out['acc'][-1]:.3f}, {len(part)} groups applied "
                  f"({st['updates_applied']} updates), {time.time() - t0:.0f} s", flush=True)
        evaluate(a.rounds)
        http.close()
    out["s"] = round(time.time() - t0, 1)
    return out


def summarise(runs: list[dict[str, Any]], modes: list[str]) -> dict[str, Any]:
    """Pool the two folds of each (mode, seed); mean accuracy over rounds t >= 1; paired tests vs frozen."""
    pooled: dict[tuple[str, int], list[list[float]]] = {}
    for r in sorted(runs, key=lambda r: r["fold"]):
        cur = pooled.setdefault((r["mode"], r["seed"]), [[] for _ in r["outcomes"]])
        for t, o in enumerate(r["outcomes"]):
            cur[t] += o
    seeds = sorted({s for _, s in pooled})
    res: dict[str, Any] = {"per_seed": {}, "paired_last_vs_frozen": {}}
    frozen = {s: pooled[("real", s)][0] for s in seeds if ("real", s) in pooled}  # round 0: w = 1, the RM itself
    curves = {m: [[sum(o) / len(o) for o in pooled[(m, s)]] for s in seeds if (m, s) in pooled] for m in modes}
    res["frozen"] = statistics.mean(sum(o) / len(o) for o in frozen.values()) if frozen else None
    for m in modes:
        if not curves[m]:
            continue
        res[{"real": "r2m"}.get(m, m)] = statistics.mean(statistics.mean(c[1:]) for c in curves[m])
        res[f"{m}_curve_mean"] = [statistics.mean(c[t] for c in curves[m]) for t in range(len(curves[m][0]))]
        res["per_seed"][m] = {str(s): c for s, c in zip([s for s in seeds if (m, s) in pooled], curves[m],
                                                         strict=True)}
        wa = wb = 0
        for s in seeds:
            if (m, s) in pooled and s in frozen:
                last, base = pooled[(m, s)][-1], frozen[s]
                wa += sum(1 for x, y in zip(last, base, strict=True) if x > y)
                wb += sum(1 for x, y in zip(last, base, strict=True) if y > x)
        res["paired_last_vs_frozen"][m] = {"only_mode": wa, "only_frozen": wb, "p": sign_test(wa, wb)}
    res["pairs"] = len(next(iter(frozen.values()))) if frozen else 0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--states", default=str(ROOT / "runs/r2m_policy_states.npz"))
    ap.add_argument("--model", default=None, help="reward model (default: the shipped default)")
    ap.add_argument("--modes", default="real,noise,informed")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--train-groups", type=int, default=120,
                    help="groups streamed per run (a seeded subsample of the other fold's; 0 = all)")
    ap.add_argument("--lr", type=float, default=3e-3, help="head lr (bench_r2m.py's simulation setting)")
    ap.add_argument("--steps", type=int, default=4, help="GREBT steps per update (bench_r2m.py's setting)")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--partial", default=str(ROOT / "runs/r2m_offline_partial.json"))
    ap.add_argument("--json", default=str(ROOT / "bench/results/r2m_policy.json"))
    a = ap.parse_args()
    t0 = time.time()
    groups = load_groups(Path(a.states))
    mixed = [g for g in groups if 0 < sum(g["right"]) < len(g["right"])]
    random.Random(a.split_seed).shuffle(mixed)
    folds = [mixed[0::2], mixed[1::2]]
    print(f"{len(groups)} groups, {len(mixed)} mixed, "
          f"{sum(len(pair_outcomes([0.0] * len(g['right']), g['right'])) for g in mixed)} evaluation pairs", flush=True)
    modes = a.modes.split(",")
    if "real" not in modes:
        raise SystemExit("--modes must include real (its round 0 is the frozen RM)")
    part = Path(a.partial)
    runs: list[dict[str, Any]] = json.loads(part.read_text()) if part.is_file() else []
    done = {(r["mode"], r["seed"], r["fold"]) for r in runs}
    tmp = Path(tempfile.mkdtemp(prefix="r2m-offline-"))
    for seed in (int(s) for s in a.seeds.split(",")):
        for mode in modes:
            for f in (0, 1):
                if (mode, seed, f) in done:
                    continue
                ev_ids = {g["gid"] for g in folds[f]}
                train = [g for g in groups if g["gid"] not in ev_ids]
                r = run(mode, seed, f, folds[f], train, a, tmp)
                runs.append(r)
                part.parent.mkdir(parents=True, exist_ok=True)
                part.write_text(json.dumps(runs))  # resumable: a rerun skips what is here
                print(f"{mode} seed {seed} fold {f}: acc by round {[round(x, 3) for x in r['acc']]} ({r['s']} s)",
                      flush=True)
    summary = summarise(runs, modes)
    summary.update({"groups": len(groups), "mixed_groups": len(mixed), "rounds": a.rounds, "lr": a.lr,
                    "train_groups_per_run": a.train_groups,
                    "steps_per_update": a.steps, "seeds": a.seeds, "modes": modes,
                    "run_s": {f"{r['mode']}-s{r['seed']}-f{r['fold']}": r["s"] for r in runs},
                    "wall_s": round(time.time() - t0, 1), "command": "python " + " ".join(sys.argv)})
    print(json.dumps({k: v for k, v in summary.items() if k != "per_seed"}, indent=1))
    merge_json(Path(a.json), "offline", summary)
    print(f"wrote {a.json} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
