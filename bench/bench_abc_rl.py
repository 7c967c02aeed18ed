"""ABC's claim where it matters: a policy trained against rewardkit with dense (ABC) rewards vs the sparse reward.

ABC (Chan et al. 2024) claims that a policy trained with the reward model's attention-redistributed per-token
rewards learns faster and more stably than with the end-of-sequence reward, at the same optimum (potential-based
shaping). This benchmark tests that claim through the product, the way a user runs it: a reward model trained with
``rewardkit train bt``, served by ``rewardkit serve`` (a real server process), queried over HTTP by
``RewardClient.score_dense`` with ``response_token_spans`` from the policy's own tokens.

The task (gold reward known, per token, and it depends on where each word sits): the policy writes T words from a
16-word vocabulary in a fixed cycle order (Paris, Rome, Vienna, ...); a word is correct when it is the successor of
the word before it (the first word: when it is the cycle's first). Gold = share of correct words; the per-token gold
is 1/T on each correct word. A random policy scores 1/16; the optimum is 1.0. Each previous word is its own decision,
so a sequence-level reward tells the policy little about which of its T choices were right: credit assignment is
the problem. (A first version, "share of words from a good set", was learnt in ~18 steps by every arm, oracle
included: one shared decision, nothing for credit to assign.)

The reward model: a tiny causal transformer (hidden 128, 2 layers, random init) trained in full with the project's BT
trainer on pairs of random word sequences labelled by gold (held-out accuracy reported). It never sees the policy.
Then its attention is trained to read its reward (the attention step, since 2026-12-07; ``--no-attention-step`` for
the BT model as it was): ``rewardkit train idrm --attention-source data`` (BT + eta * KL between a target and the
reward token's last-layer attention over the response, full fine-tuning) on 1,000 fresh pairs, where each word's
target weight is softmax(sign(R) * z(its occlusion effect on the model's own reward)), so that ABC's a_t * R ranks
the words as their effects do; 3 rounds, the targets re-read from the model each round (training moves the effects).
The BT model's faithfulness is measured before the step, as the control.

The policy: a GRU over the 16 words, from scratch; REINFORCE with returns-to-go and a per-position baseline
(advantages normalised per batch; the same hyper-parameters for every arm). Arms:

- ``sparse``: the RM's reward R on the last token;
- ``abc_0.8``, ``abc_1.0``: the server's ABC rewards, r_t = beta a_t R + (1-beta) R [t=T];
- ``uniform``: R/T on every token (same density as ABC, no location);
- ``shuffled``: ABC's weights permuted within the response (same density and values, wrong location);
- ``oracle``: the per-token gold (no RM);
- ``gold_sparse``: the true sequence gold on the last token (no RM): how much of any gap is credit assignment
  itself, apart from the RM's errors.

The policy starts from a brief supervised warm start on the task's text (sequences with 30% rule-following words:
gold ~0.33), as an RL run starts from a tuned LM. From scratch (gold 1/16), every RM-rewarded arm stayed flat for 150
steps while the oracle reached 0.8: the RM cannot rank sequences that differ by one or two correct words.

Metrics per run: ``steps_to_80`` (first step whose smoothed gold, a 5-step moving mean, reaches 80% of the best
smoothed gold any arm reached at that length; null if never), ``auc`` (mean of gold / that best over training),
``final_gold`` (mean gold of the last 10 steps). Faithfulness: Spearman between ABC's per-token rewards and each
token's occlusion effect on the RM's reward (the token replaced by a neutral word), for the RL benchmark's RM and
(full mode) for the default model (occlusion = deleting the word), with a random-weights control.

    .venv/bin/python bench/bench_abc_rl.py            # lengths 16/64/128, 3 seeds, + the default model (~25 min)
    .venv/bin/python bench/bench_abc_rl.py --quick    # one seed, length 16, fewer steps (< 3 min)

Writes bench/results/abc_rl.json (``--out`` to change) and, in full mode, docs/abc_rl_curves.png.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, python, start_process, stop_process, write_json  # noqa: E402

VOCAB = ["Paris", "Rome", "Vienna", "Lisbon", "dog", "fox", "lazy", "brown", "quick", "jumps", "hour", "minutes",
         "metres", "item", "words", "forty"]  # single tokens of the tiny RM's tokenizer (with a leading space)
NEUTRAL = "the"  # the occlusion stand-in: in neither set
PROMPT = "Write words."
PRETRAIN_SKILL = 0.3  # share of rule-following words in the warm-start text
ARMS = ("sparse", "abc_0.8", "abc_1.0", "uniform", "shuffled", "oracle", "gold_sparse")


# ------------------------------------------------------------------------------------------ task and reward model


def correct(words: list[int]) -> list[bool]:
    """Per word: is it the successor (in VOCAB's cycle) of the word before it (of -1 for the first)?"""
    prev = [-1, *words[:-1]]
    return [w == (p + 1) % len(VOCAB) for w, p in zip(words, prev, strict=True)]


def gold(words: list[int]) -> float:
    return sum(correct(words)) / len(words)


def text_and_spans(words: list[int]) -> tuple[str, list[list[int]]]:
    parts, spans, pos = [], [], 0
    for w in words:
        s = VOCAB[w]
        spans.append([pos, pos + len(s)])
        parts.append(s)
        pos += len(s) + 1
    return " ".join(parts), spans


def random_words(rng: random.Random, length: int, p_good: float) -> list[int]:
    """Each word the successor of the last with probability ``p_good``, else uniform."""
    out: list[int] = []
    for _ in range(length):
        prev = out[-1] if out else -1
        out.append((prev + 1) % len(VOCAB) if rng.random() < p_good else rng.randrange(len(VOCAB)))
    return out


def make_pairs(n: int, seed: int, lengths: tuple[int, int]) -> list[dict[str, Any]]:
    """Pairs of random sequences of one length, chosen = more correct words (ties skipped). Half the pairs are
    "near": both sides' skill close and mostly low, where a fresh policy's batches live (a first version with only
    independent skills gave 0.91 held-out accuracy, yet policies trained on its reward did not move in 150 steps:
    it could not rank sequences one or two correct words apart)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    while len(out) < n:
        length = rng.randint(*lengths)
        if len(out) % 2:
            p = rng.random() ** 2
            q = min(1.0, max(0.0, p + rng.uniform(-0.15, 0.15)))
        else:
            p, q = rng.random(), rng.random()
        a, b = random_words(rng, length, p), random_words(rng, length, q)
        if gold(a) == gold(b):
            continue
        hi, lo = (a, b) if gold(a) > gold(b) else (b, a)
        out.append({"prompt": PROMPT, "chosen": text_and_spans(hi)[0], "rejected": text_and_spans(lo)[0]})
    return out


def train_rm(tmp: Path, n_pairs: int, max_len: int, seed: int, epochs: float = 3, hidden: int = 128,
             layers: int = 2) -> tuple[Path, dict[str, Any]]:
    """A tiny transformer trained in full with rewardkit's BT trainer; returns its checkpoint and held-out accuracy."""
    from rewardkit.core.testing import make_tiny_reward_model
    from rewardkit.training.bt import train_bt
    from rewardkit.training.config import BTConfig

    base = make_tiny_reward_model(tmp / "rm-init", arch="llama", hidden=hidden, layers=layers, seed=seed)
    train, held = tmp / "rm-train.jsonl", tmp / "rm-held.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n_pairs, seed, (8, max_len))))
    held.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(300, seed + 10_000, (8, max_len))))
    out = tmp / "rm"
    t0 = time.time()
    res = train_bt(BTConfig(model=str(base), mode="full", train_file=str(train), eval_file=str(held),
                            learning_rate=1e-3, num_epochs=epochs, batch_size=16, max_length=1024, output_dir=str(out),
                            seed=seed, disable_tqdm=True, logging_steps=50, model_id="abc-rl-rm"))
    info = {"pairs": n_pairs, "epochs": epochs, "hidden": hidden, "layers": layers, "held_out_pairs": 300, "train_s": round(time.time() - t0, 1),
            "train_accuracy": res.metrics.get("train_accuracy"),
            "held_out_accuracy": (res.metrics.get("eval") or {}).get("accuracy")}
    return out, info


def words_of(text: str) -> list[int]:
    return [VOCAB.index(w) for w in text.split(" ")]


def attention_spans(text: str, reward: float) -> list[list[float]]:
    """The reward token's target for ``text``: the words that make its (normalised) reward what it is. ABC gives a
    token a_t * R with a_t >= 0, so a faithful split puts the mass on the words that raise the reward when R >= 0
    (the correct ones) and on those that lower it when R < 0 (the incorrect ones)."""
    w = words_of(text)
    _, spans = text_and_spans(w)
    ok = correct(w)
    keep = [sp for sp, c in zip(spans, ok, strict=True) if c == (reward >= 0)]
    return [[a, b, 1.0] for a, b in keep]


def occlusion_spans(text: str, reward: float, occluded: np.ndarray) -> list[list[float]]:
    """The reward token's target from the model's own sensitivities: word t's weight is
    softmax_t(sign(R) * z_t), z the standardised occlusion effects ``reward - occluded`` (T,). So a_t * R ranks the
    words as their effects do: the words that move the reward most in its own direction get the most mass."""
    w = words_of(text)
    _, spans = text_and_spans(w)
    eff = reward - occluded
    z = (eff - eff.mean()) / (eff.std() + 1e-6) * (1.0 if reward >= 0 else -1.0)
    p = np.exp(z - z.max())
    p = p / p.sum()
    return [[a, b, float(x)] for (a, b), x in zip(spans, p, strict=True)]


def attention_step(tmp: Path, rm_dir: Path, n_pairs: int, max_len: int, seed: int, epochs: float = 1.0,
                   eta: float = 1.0, target: str = "occlusion") -> tuple[Path, dict[str, Any]]:
    """Train the BT reward model's last-layer attention to read the reward (``rewardkit train idrm`` with
    ``attention_source=data``: BT + eta * KL(target || the reward token's attention), full fine-tuning). Targets:
    ``occlusion`` (:func:`occlusion_spans`, the BT model's own per-word effects) or ``gold`` (:func:`attention_spans`,
    the words the gold rule says decide). Returns the checkpoint and its report."""
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model
    from rewardkit.core.scoring import Scorer
    from rewardkit.training.idrm import IdRMConfig, train_idrm

    rm = load_reward_model(rm_dir)
    fmt, scorer = Formatter(rm.tokenizer, max_length=1024), Scorer(rm)
    pairs = make_pairs(n_pairs, seed + 20_000, (8, max_len))  # pairs the BT model did not train on
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    t_target = time.time()
    rewards: list[float] = []
    for i in range(0, len(texts), 64):
        encs = [fmt.encode(ScoreItem(prompt=PROMPT, response=t)) for t in texts[i:i + 64]]
        rewards += [s.reward for s in scorer.score_batch(encs)]
    if target == "gold":
        spans = [attention_spans(t, r) for t, r in zip(texts, rewards, strict=True)]
    else:  # each word replaced by the neutral word, scored in batches
        spans = []
        for t, r in zip(texts, rewards, strict=True):
            ws = t.split(" ")
            occ = [" ".join([*ws[:k], NEUTRAL, *ws[k + 1:]]) for k in range(len(ws))]
            sc = scorer.score_batch([fmt.encode(ScoreItem(prompt=PROMPT, response=o)) for o in occ])
            spans.append(occlusion_spans(t, r, np.array([x.reward for x in sc])))
    rows = [{**p, "chosen_attention": spans[2 * i], "rejected_attention": spans[2 * i + 1]}
            for i, p in enumerate(pairs)]
    data = tmp / "rm-attention.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp / "rm-att"
    t0 = time.time()
    res = train_idrm(IdRMConfig(model=str(rm_dir), mode="full", train_file=str(data), eval_file=str(tmp / "rm-held.jsonl"),
                                attention_source="data", eta=eta, align_layers=1, learning_rate=5e-4,
                                num_epochs=epochs, batch_size=16, max_length=1024, output_dir=str(out), seed=seed,
                                disable_tqdm=True, logging_steps=50, model_id="abc-rl-rm-att"))
    info = {"pairs": n_pairs, "epochs": epochs, "eta": eta, "train_s": round(time.time() - t0, 1),
            "kl_last": res.metrics.get("train_kl_last"), "bt_loss_last": res.metrics.get("train_bt_loss_last"),
            "held_out_accuracy": (res.metrics.get("eval") or {}).get("accuracy"),
            "target": target, "target_seconds": round(t0 - t_target, 1)}
    return out, info


# ------------------------------------------------------------------------------------------ policy and RL


class Policy(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(len(VOCAB) + 1, 32)  # + BOS
        self.rnn = nn.GRUCell(32, hidden)
        self.out = nn.Linear(hidden, len(VOCAB))
        nn.init.zeros_(self.out.weight)  # start uniform: gold 0.25
        nn.init.zeros_(self.out.bias)

    def sample(self, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) words and their log-probabilities."""
        h = torch.zeros(batch, self.rnn.hidden_size)
        x = torch.full((batch,), len(VOCAB), dtype=torch.long)
        words, logps = [], []
        for _ in range(length):
            h = self.rnn(self.emb(x), h)  # (B, H)
            dist = torch.distributions.Categorical(logits=self.out(h))
            x = dist.sample()
            words.append(x)
            logps.append(dist.log_prob(x))
        return torch.stack(words, 1), torch.stack(logps, 1)  # (B, T), (B, T)

    def log_prob(self, words: torch.Tensor) -> torch.Tensor:
        """(B, T) log-probabilities of given words (teacher forcing)."""
        b, t = words.shape
        h = torch.zeros(b, self.rnn.hidden_size)
        x = torch.full((b,), len(VOCAB), dtype=torch.long)
        out = []
        for i in range(t):
            h = self.rnn(self.emb(x), h)
            out.append(torch.log_softmax(self.out(h), -1).gather(1, words[:, i:i + 1]).squeeze(1))
            x = words[:, i]
        return torch.stack(out, 1)


def pretrain(policy: Policy, length: int, seed: int, p_good: float = PRETRAIN_SKILL, steps: int = 60) -> None:
    """Supervised warm start on the task's text: sequences where each word follows the rule with probability
    ``p_good`` (a policy that writes the task's words, sometimes in order), as an RL run starts from a tuned LM."""
    rng = random.Random(10_000 + seed)
    opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        words = torch.tensor([random_words(rng, length, p_good) for _ in range(32)])
        loss = -policy.log_prob(words).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def token_rewards(arm: str, words: list[list[int]], client: Any, rng: np.random.Generator) -> np.ndarray:
    """(B, T) per-token rewards of one batch for ``arm``, from the server (all but oracle)."""
    b, t = len(words), len(words[0])
    out = np.zeros((b, t), dtype=np.float64)
    if arm == "oracle":
        for i, w in enumerate(words):
            out[i] = [1.0 / t if c else 0.0 for c in correct(w)]
        return out
    if arm == "gold_sparse":  # control: the true reward, on the last token only (credit assignment without RM error)
        out[:, -1] = [gold(w) for w in words]
        return out
    texts, spans = zip(*(text_and_spans(w) for w in words), strict=True)
    if arm in ("sparse", "uniform"):
        rewards = np.asarray(client.score(prompts=[PROMPT] * b, responses=list(texts)), dtype=np.float64)
        if arm == "sparse":
            out[:, -1] = rewards
        else:
            out[:] = rewards[:, None] / t
        return out
    beta = 0.8 if arm == "abc_0.8" else 1.0
    dense = client.score_dense(prompts=[PROMPT] * b, responses=list(texts), beta=beta,
                               response_token_spans=[list(s) for s in spans])
    for i, d in enumerate(dense):
        r = np.asarray(d.token_rewards, dtype=np.float64)
        assert r.shape == (t,), (r.shape, t)
        out[i] = rng.permutation(r) if arm == "shuffled" else r
    return out


def run_arm(arm: str, length: int, seed: int, steps: int, url: str, batch: int = 32, lr: float = 3e-3
            ) -> list[float]:
    """Gold reward per step of one RL run."""
    from rewardkit.client import RewardClient

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    policy = Policy()
    pretrain(policy, length, seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    curve: list[float] = []
    with RewardClient(url, timeout=120) as client:
        for _ in range(steps):
            words_t, logp = policy.sample(batch, length)
            words = words_t.tolist()
            curve.append(float(np.mean([gold(w) for w in words])))
            r = torch.as_tensor(token_rewards(arm, words, client, rng), dtype=torch.float32)  # (B, T)
            ret = r.flip(1).cumsum(1).flip(1)  # returns-to-go, gamma 1
            adv = ret - ret.mean(0, keepdim=True)  # per-position baseline
            adv = adv / (adv.std() + 1e-8)
            loss = -(logp * adv).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return curve


def smooth(curve: list[float], k: int = 5) -> list[float]:
    return [float(np.mean(curve[max(0, i - k + 1): i + 1])) for i in range(len(curve))]


def summarise(runs: list[dict[str, Any]]) -> None:
    """Fill steps_to_80 and auc against the best smoothed gold any arm reached at the run's length."""
    for length in {r["length"] for r in runs}:
        same = [r for r in runs if r["length"] == length]
        best = max(max(smooth(r["curve"])) for r in same)
        for r in same:
            s = smooth(r["curve"])
            r["best_at_length"] = best
            r["steps_to_80"] = next((i + 1 for i, v in enumerate(s) if v >= 0.8 * best), None)
            r["auc"] = float(np.mean(r["curve"]) / best)
            r["final_gold"] = float(np.mean(r["curve"][-10:]))


# ------------------------------------------------------------------------------------------ faithfulness


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float) for x in (a, b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def faithfulness_task_rm(url: str, n: int, length: int, seed: int) -> dict[str, Any]:
    """Spearman(ABC per-token reward, occlusion effect) on random sequences; controls: random weights, gold."""
    from rewardkit.client import RewardClient

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    rho, rho_abs, rho_rand, rho_gold = [], [], [], []
    with RewardClient(url, timeout=120) as client:
        for _ in range(n):
            w = random_words(rng, length, rng.random())
            text, spans = text_and_spans(w)
            d = client.score_dense(prompts=[PROMPT], responses=[text], beta=1.0, response_token_spans=[spans])[0]
            occluded = []
            for t in range(length):
                words = [VOCAB[x] for x in w]
                words[t] = NEUTRAL
                occluded.append(" ".join(words))
            r_occ = np.asarray(client.score(prompts=[PROMPT] * length, responses=occluded), dtype=np.float64)
            effect = d.reward - r_occ  # (T,)
            credit = np.asarray(d.token_rewards, dtype=np.float64)
            rho.append(spearman(credit, effect))
            rho_abs.append(spearman(np.abs(credit), np.abs(effect)))
            rho_rand.append(spearman(nrng.random(length), effect))
            rho_gold.append(spearman(np.array(correct(w), dtype=float), effect))
    return _rho_summary(rho, rho_abs, rho_rand, n, {"gold_correct_indicator": float(np.nanmean(rho_gold)),
                                                    "length": length, "occlusion": f"word -> {NEUTRAL!r}"})


def _rho_summary(rho: list[float], rho_abs: list[float], rho_rand: list[float], n: int,
                 extra: dict[str, Any]) -> dict[str, Any]:
    def se(x: list[float]) -> float:  # standard error of the mean over sequences
        v = np.asarray(x, dtype=np.float64)
        v = v[~np.isnan(v)]
        return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")

    return {"spearman": float(np.nanmean(rho)), "spearman_se": se(rho), "spearman_abs": float(np.nanmean(rho_abs)),
            "spearman_abs_se": se(rho_abs), "random_weights": float(np.nanmean(rho_rand)),
            "random_weights_se": se(rho_rand), "items": n, **extra}


def faithfulness_default(tmp: Path, n: int, seed: int) -> dict[str, Any]:
    """The same measure for the default model (SmolLM2 + trained head) on outside-written chosen answers;
    occlusion deletes a word."""
    from rewardkit.client import RewardClient

    rows = [json.loads(line) for line in (ROOT / "bench/data/outside/clean.jsonl").read_text().splitlines()][:n]
    url = "http://127.0.0.1:8763"
    proc = start_process([python(), "-m", "rewardkit.cli", "serve", "--port", "8763"], url, tmp / "default.log")
    nrng = np.random.default_rng(seed)
    rho, rho_abs, rho_rand = [], [], []
    try:
        with RewardClient(url, timeout=300) as client:
            for row in rows:
                words = row["chosen"].split()
                if len(words) < 3:
                    continue
                text = " ".join(words)
                spans, pos = [], 0
                for w in words:
                    spans.append([pos, pos + len(w)])
                    pos += len(w) + 1
                d = client.score_dense(prompts=[row["prompt"]], responses=[text], beta=1.0,
                                       response_token_spans=[spans])[0]
                dropped = [" ".join(words[:t] + words[t + 1:]) for t in range(len(words))]
                r_occ = np.asarray(client.score(prompts=[row["prompt"]] * len(words), responses=dropped))
                effect = d.reward - r_occ
                credit = np.asarray(d.token_rewards, dtype=np.float64)
                rho.append(spearman(credit, effect))
                rho_abs.append(spearman(np.abs(credit), np.abs(effect)))
                rho_rand.append(spearman(nrng.random(len(words)), effect))
    finally:
        stop_process(proc)
    return _rho_summary(rho, rho_abs, rho_rand, len(rho), {"occlusion": "word deleted",
                                                          "pairs": "bench/data/outside/clean.jsonl (chosen)"})


# ------------------------------------------------------------------------------------------ report


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for length in sorted({r["length"] for r in runs}):
        for arm in ARMS:
            rs = [r for r in runs if r["length"] == length and r["arm"] == arm]
            if not rs:
                continue
            s80 = [r["steps_to_80"] for r in rs]
            reached = [x for x in s80 if x is not None]
            rows.append({"length": length, "arm": arm, "seeds": len(rs),
                         "steps_to_80_median": statistics.median(x if x is not None else float("inf") for x in s80),
                         "reached_80": f"{len(reached)}/{len(rs)}",
                         "auc_mean": float(np.mean([r["auc"] for r in rs])),
                         "final_gold_mean": float(np.mean([r["final_gold"] for r in rs]))})
    return rows


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["length"] for r in runs})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5 * len(lengths), 4), squeeze=False)
    for ax, length in zip(axes[0], lengths, strict=True):
        for arm in ARMS:
            curves = np.array([smooth(r["curve"]) for r in runs if r["length"] == length and r["arm"] == arm])
            if not len(curves):
                continue
            x = np.arange(1, curves.shape[1] + 1)
            ax.plot(x, curves.mean(0), label=arm)
            ax.fill_between(x, curves.min(0), curves.max(0), alpha=0.15)
        ax.set_title(f"T = {length} words ({len({r['seed'] for r in runs})} seeds; band = min-max)")
        ax.set_xlabel("RL step (batch of 32)")
        ax.set_ylabel("gold reward (share of correct words, 5-step mean)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, length 16, 60 steps, a smaller RM (< 3 min)")
    ap.add_argument("--lengths", default="16,64,128")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--rm-pairs", type=int, default=4000, help="BT training pairs of the reward model")
    ap.add_argument("--rm-epochs", type=float, default=3)
    ap.add_argument("--skip-default-model", action="store_true", help="no faithfulness run on the default model")
    ap.add_argument("--no-attention-step", action="store_true",
                    help="serve the BT reward model as trained (the first version of this benchmark)")
    ap.add_argument("--att-pairs", type=int, default=1000, help="pairs of the attention step")
    ap.add_argument("--att-epochs", type=float, default=2.0)
    ap.add_argument("--att-eta", type=float, default=3.0)
    ap.add_argument("--att-rounds", type=int, default=3, help="attention-step rounds, targets re-read each round")
    ap.add_argument("--att-target", choices=("occlusion", "gold"), default="occlusion",
                    help="the attention step's targets: the BT model's own occlusion effects, or the gold rule")
    ap.add_argument("--faith-only", action="store_true", help="stop after the faithfulness measurements (no RL)")
    ap.add_argument("--faith-seed", type=int, default=1, help="seed of the faithfulness sequences")
    ap.add_argument("--out", default=str(ROOT / "bench/results/abc_rl.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs/abc_rl_curves.png"))
    args = ap.parse_args()
    lengths = [16] if args.quick else [int(x) for x in args.lengths.split(",")]
    seeds = 1 if args.quick else args.seeds
    steps = 60 if args.quick else args.steps
    torch.set_num_threads(1)  # the server has the other core
    tmp = Path(tempfile.mkdtemp(prefix="rk-abc-rl-"))
    t0 = time.time()
    rm_dir, rm_info = train_rm(tmp, 1000 if args.quick else args.rm_pairs, max(lengths), seed=0,
                               epochs=args.rm_epochs)
    print(f"reward model: {rm_info}", flush=True)
    url = "http://127.0.0.1:8762"
    faith_bt = None
    if not args.no_attention_step:  # the BT model's faithfulness is the control; the RL arms use the trained one
        proc = start_process([python(), "-m", "rewardkit.cli", "serve", "--model", str(rm_dir), "--port", "8762",
                              "--max-length", "1024", "--max-wait-ms", "2"], url, tmp / "server-bt.log",
                             env_extra={"REWARDKIT_PADDING_FREE": "off"})
        try:
            faith_bt = faithfulness_task_rm(url, 20 if args.quick else 60, 32, seed=args.faith_seed)
        finally:
            stop_process(proc)
        print(f"faithfulness (BT RM, before the attention step): {faith_bt}", flush=True)
        steps_info = []
        for k in range(args.att_rounds):  # occlusion targets re-read from the model each round: training moves them
            sub = tmp / f"att-round{k}"
            sub.mkdir()
            (sub / "rm-held.jsonl").write_text((tmp / "rm-held.jsonl").read_text())
            rm_dir, att_info = attention_step(sub, rm_dir, 500 if args.quick else args.att_pairs, max(lengths),
                                              seed=k, epochs=args.att_epochs, eta=args.att_eta, target=args.att_target)
            steps_info.append(att_info)
        rm_info = {**rm_info, "attention_step": steps_info}
        print(f"attention step: {steps_info}", flush=True)
    # padding-free off: a batch of one length's ABC items is one forward (padding-free runs dense items one by one)
    proc = start_process([python(), "-m", "rewardkit.cli", "serve", "--model", str(rm_dir), "--port", "8762",
                          "--max-length", "1024", "--max-wait-ms", "2"], url, tmp / "server.log",
                         env_extra={"REWARDKIT_PADDING_FREE": "off"})
    runs: list[dict[str, Any]] = []
    out = Path(args.out)
    try:
        faith = faithfulness_task_rm(url, 20 if args.quick else 60, 32, seed=args.faith_seed)
        if faith_bt is not None:
            faith = {**faith, "bt_before_attention_step": faith_bt}
        print(f"faithfulness (task RM): {faith}", flush=True)
        for seed in range(0 if args.faith_only else seeds):  # seeds outermost: a partial file holds every length
            for length in lengths:
                for arm in ARMS:
                    t1 = time.time()
                    curve = run_arm(arm, length, seed, steps, url)
                    runs.append({"arm": arm, "length": length, "seed": seed, "steps": steps, "curve": curve,
                                 "wall_s": round(time.time() - t1, 1)})
                    print(f"T={length:<4} seed={seed} {arm:<9} gold {curve[0]:.2f} -> {np.mean(curve[-10:]):.2f} "
                          f"({time.time() - t1:.0f} s)", flush=True)
                    summarise(runs)
                    write_json(out, {"partial": True, "reward_model": rm_info, "faithfulness": {"task_rm": faith},
                                     "runs": runs})
    finally:
        stop_process(proc)
    faithfulness = {"task_rm": faith}
    if not args.quick and not args.skip_default_model:
        faithfulness["default_model"] = fd = faithfulness_default(tmp, 40, seed=2)
        print(f"faithfulness (default model): {fd}", flush=True)
    summarise(runs)
    rows = table(runs)
    for r in rows:
        print(f"T={r['length']:<4} {r['arm']:<9} steps_to_80 median {r['steps_to_80_median']} "
              f"({r['reached_80']} reached) auc {r['auc_mean']:.3f} final {r['final_gold_mean']:.3f}")
    write_json(out, {"partial": False, "reward_model": rm_info, "faithfulness": faithfulness, "table": rows,
                     "runs": runs, "wall_s": round(time.time() - t0, 1),
                     "settings": {"lengths": lengths, "seeds": seeds, "steps": steps, "batch": 32, "lr": 3e-3,
                                  "vocab": VOCAB, "task": "successor in the vocabulary's cycle"}})
    if not args.quick:
        plot(runs, Path(args.plot))
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
