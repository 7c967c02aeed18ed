"""Bradley-Terry reward-model training (``rewardkit train bt``): frozen backbone, LoRA, or full fine-tune.

The loss is :func:`rewardkit.core.losses.bt_loss`. Texts are formatted by the server's
:class:`~rewardkit.core.formatting.Formatter` and rewards read by the server's rule, so the written checkpoint scores
exactly as the model did in training. Three modes:

* ``frozen``: the backbone runs once over the data (feature caching through the server's
  :class:`~rewardkit.core.scoring.Scorer`), then a linear head trains on the cached reward-token hidden states. The
  features are divided by their per-dimension std for conditioning; the scale is folded back into the head, so the
  saved head reads raw hidden states. This is what makes CPU training of a 135M backbone take minutes.
* ``lora``: peft LoRA adapters on ``lora_target_modules`` + the head; the adapter is saved in ``DIR/adapter``.
* ``full``: every parameter; the backbone is saved as an HF directory in ``DIR/backbone``.

Runs on ``accelerate`` (CPU, one GPU, or several with ``accelerate launch``), bf16 autocast on GPU, gradient
accumulation, a tqdm bar with loss and accuracy, and a JSONL run log (``DIR/train_log.jsonl``).

Example::

    result = train_bt(BTConfig(train_file="data/testbed", output_dir="runs/bt", num_epochs=20))
    result.metrics["train_accuracy"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.formatting import Formatter
from rewardkit.core.forward import pad_batch, reward_indices
from rewardkit.core.loading import EMBEDDED_SMOLLM2, RewardModel, load_reward_model
from rewardkit.core.losses import bt_loss, pair_stats
from rewardkit.training.config import BTConfig, resolve_split
from rewardkit.training.data import PreferencePair, load_preferences
from rewardkit.training.features import EncodedPair, encode_pairs, extract_features, pair_batches

log = logging.getLogger(__name__)

__all__ = ["RewardForward", "TrainResult", "train_bt"]

LOG_FILE = "train_log.jsonl"
RESULT_FILE = "train_result.json"


@dataclasses.dataclass
class TrainResult:
    """What a run produced: the checkpoint directory, the trained model (in memory), metrics and step count."""

    output_dir: Path
    rm: RewardModel
    metrics: dict[str, Any]
    steps: int


class RewardForward(nn.Module):
    """Body + head at the reward token, as :class:`~rewardkit.core.scoring.Scorer` computes it, differentiable.

    A module (rather than a function) so ``accelerator.prepare`` can wrap it for distributed training.
    """

    def __init__(self, model: nn.Module, head: nn.Linear, pad_token_id: int, rule: str) -> None:
        super().__init__()
        self.model = model
        self.head = head
        self.pad_token_id = pad_token_id
        self.rule = rule

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        body: Any = self.model.base_model  # the transformer without its head
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state  # (B, T, H)
        idx = reward_indices(ids, mask, self.pad_token_id, self.rule)  # (B,)
        h_r = hidden[torch.arange(ids.shape[0], device=ids.device), idx]  # (B, H)
        return self.head(h_r).squeeze(-1).float()  # (B,)


# ---------------------------------------------------------------------------------------------- run bookkeeping


class RunLog:
    """Append-only JSONL run log, flushed per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("w", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record, sort_keys=True) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _load_pairs(path: str, split: str, limit: int, seed: int, max_drop_fraction: float
                ) -> tuple[list[PreferencePair], Path, dict[str, Any]]:
    file = resolve_split(path, split)
    pairs, report = load_preferences(file, max_drop_fraction=max_drop_fraction)
    if limit and limit < len(pairs):
        rng = random.Random(f"rewardkit-bt:{seed}:{split}")
        pairs = rng.sample(pairs, limit)
    return pairs, file, report.to_dict()


def _backbone_reference(cfg: BTConfig, rm: RewardModel) -> tuple[str, str | None]:
    """The backbone reference to record in rewardkit.json (absolute paths, so the checkpoint can move)."""
    if cfg.model in ("embedded", "default") or rm.meta.backbone == EMBEDDED_SMOLLM2:
        return EMBEDDED_SMOLLM2, None
    src = Path(cfg.model)
    if ckpt.is_checkpoint(src):
        ref = rm.meta.backbone
        if ref != EMBEDDED_SMOLLM2 and not Path(ref).is_absolute() and (src / ref).exists():
            ref = str((src / ref).resolve())
        return ref, rm.meta.gguf_file
    if src.exists():
        return str(src.resolve()), None
    return cfg.model, None  # a hub id


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def _total_steps(cfg: BTConfig, n_pairs: int) -> int:
    per_epoch = math.ceil(n_pairs / cfg.batch_size / cfg.gradient_accumulation_steps)
    return cfg.max_steps or max(1, math.ceil(per_epoch * cfg.num_epochs))


def _make_accelerator(cfg: BTConfig) -> Any:
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def _batches_forever(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Seeded reshuffle every epoch; the last partial batch of an epoch is kept."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, batch_size):
            yield perm[s:s + batch_size]


# ---------------------------------------------------------------------------------------------- the loops


def _optimise(cfg: BTConfig, accelerator: Any, module: nn.Module, params: list[nn.Parameter],
              rewards_fn: Callable[[list[int]], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
              n_pairs: int, run_log: RunLog) -> tuple[int, dict[str, float]]:
    """The shared optimisation loop. ``rewards_fn(batch)`` returns ``(r_c, r_r, margin)`` for pair indices."""
    from tqdm.auto import tqdm

    total = _total_steps(cfg, n_pairs)
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, int(cfg.warmup_ratio * total)))
    opt, sched = accelerator.prepare(opt, sched)
    batches = _batches_forever(n_pairs, cfg.batch_size, cfg.seed)
    step, window, last = 0, [], {"loss": float("nan"), "accuracy": float("nan"), "margin": float("nan")}
    bar = tqdm(total=total, desc="train bt", unit="step", disable=cfg.disable_tqdm or not accelerator.is_main_process,
               dynamic_ncols=True)
    module.train()
    while step < total:
        for _ in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(module):
                r_c, r_r, margin = rewards_fn(next(batches))
                loss = bt_loss(r_c, r_r, margin, cfg.center_rewards_coefficient or None)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
            window.append({"loss": float(loss.detach()), **pair_stats(r_c.detach(), r_r.detach())})
        step += 1
        if step % cfg.logging_steps == 0 or step == total:
            last = {k: sum(w[k] for w in window) / len(window) for k in ("loss", "accuracy", "margin")}
            run_log.write(step=step, epoch=step * cfg.batch_size * cfg.gradient_accumulation_steps / n_pairs,
                          lr=sched.get_last_lr()[0], **last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last['accuracy']:.3f}")
            window = []
        bar.update(1)
    bar.close()
    module.eval()
    return step, last


def _train_frozen(cfg: BTConfig, accelerator: Any, rm: RewardModel, enc: list[EncodedPair], run_log: RunLog
                  ) -> tuple[int, dict[str, float], torch.Tensor]:
    """Head-only training on cached features. Returns steps, last logged stats, and raw training rewards (2N,)."""
    h_c, h_r = extract_features(rm, enc, max_tokens=cfg.feature_batch_tokens,
                                cache_dir=cfg.feature_cache_dir or None, progress=not cfg.disable_tqdm)
    scale = torch.cat([h_c, h_r]).std(dim=0).clamp(min=1e-6)  # (H,) per-dimension std, folded into the head below
    x_c, x_r = (h_c / scale).to(accelerator.device), (h_r / scale).to(accelerator.device)
    margins = _margins(enc)
    head = nn.Linear(rm.hidden_size, 1, bias=False)
    nn.init.zeros_(head.weight)  # deterministic start; the BT gradient at zero is the mean feature difference
    head = accelerator.prepare(head)

    def rewards(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        idx = torch.tensor(batch, device=x_c.device)
        m = None if margins is None else margins[idx].to(x_c.device)
        return head(x_c[idx]).squeeze(-1), head(x_r[idx]).squeeze(-1), m

    steps, last = _optimise(cfg, accelerator, head, list(head.parameters()), rewards, len(enc), run_log)
    w = accelerator.unwrap_model(head).weight.detach().float().cpu() / scale  # (1, H): reads raw hidden states
    with torch.no_grad():
        rm.head.weight.copy_(w.to(rm.head.weight.dtype))
        if rm.head.bias is not None:
            rm.head.bias.zero_()
        raw = torch.cat([h_c, h_r]) @ w.squeeze(0).to(h_c.dtype)  # (2N,)
    return steps, last, raw


def _margins(enc: Sequence[EncodedPair]) -> torch.Tensor | None:
    if all(p.pair.margin is None for p in enc):
        return None
    return torch.tensor([p.pair.margin or 0.0 for p in enc], dtype=torch.float32)


def _setup_trainable(cfg: BTConfig, rm: RewardModel) -> Any:
    """Turn gradients on for the chosen mode; returns the peft model for LoRA (else None)."""
    for p in rm.model.parameters():
        p.requires_grad_(cfg.mode == "full")
    peft_model = None
    if cfg.mode == "lora":
        if (Path(cfg.model) / ckpt.ADAPTER_DIR).is_dir():
            raise ValueError("model: LoRA on top of a checkpoint that already has an adapter is not supported; "
                             "start from its backbone, or use mode=frozen")
        from peft import LoraConfig, get_peft_model

        targets = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, bias="none")
        peft_model = get_peft_model(rm.model, lcfg)  # injects adapters into rm.model in place
    for p in rm.head.parameters():
        p.requires_grad_(True)
    return peft_model


def _train_backbone(cfg: BTConfig, accelerator: Any, rm: RewardModel, enc: list[EncodedPair], run_log: RunLog
                    ) -> tuple[int, dict[str, float], Any]:
    """LoRA or full fine-tune: batches of pairs through body + head. Returns steps, last stats, peft model or None."""
    peft_model = _setup_trainable(cfg, rm)
    fwd = RewardForward(rm.model, rm.head, rm.pad_token_id, rm.meta.reward_token_rule)
    params = [p for p in fwd.parameters() if p.requires_grad]
    fwd = accelerator.prepare(fwd)
    margins = _margins(enc)

    def rewards(batch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        items = [enc[i].chosen for i in batch] + [enc[i].rejected for i in batch]
        ids, mask, pos = pad_batch(items, rm.pad_token_id, "right", accelerator.device)
        r = fwd(ids, mask, pos)  # (2B,)
        m = None if margins is None else margins[torch.tensor(batch)].to(r.device)
        return r[:len(batch)], r[len(batch):], m

    steps, last = _optimise(cfg, accelerator, fwd, params, rewards, len(enc), run_log)
    for p in rm.model.parameters():
        p.requires_grad_(False)
    return steps, last, peft_model


@torch.no_grad()
def _raw_rewards(rm: RewardModel, enc: Sequence[EncodedPair], max_tokens: int) -> torch.Tensor:
    """Raw (unnormalised) rewards of both sides of every pair, (2N,) ordered chosen then rejected."""
    from rewardkit.core.scoring import Scorer

    scorer = Scorer(rm)
    out_c, out_r = torch.zeros(len(enc)), torch.zeros(len(enc))
    for batch in pair_batches(enc, max_tokens):
        s = scorer.score_batch([enc[i].chosen for i in batch] + [enc[i].rejected for i in batch])
        for j, i in enumerate(batch):
            out_c[i], out_r[i] = s[j].raw_reward, s[len(batch) + j].raw_reward
    return torch.cat([out_c, out_r])


# ---------------------------------------------------------------------------------------------- entry point


def train_bt(cfg: BTConfig, command: str | None = None) -> TrainResult:
    """Train a BT reward model as ``cfg`` says and write a rewardkit checkpoint to ``cfg.output_dir``."""
    cfg.validate()
    t0 = time.time()
    _set_seed(cfg.seed)
    accelerator = _make_accelerator(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, train_path, load_report = _load_pairs(cfg.train_file, "train", cfg.max_train_pairs, cfg.seed,
                                                 cfg.max_drop_fraction)
    rm = load_reward_model(cfg.model, device=str(accelerator.device), dtype="float32",
                           reward_token_rule=cfg.reward_token_rule)
    fmt = Formatter(rm.tokenizer, max_length=cfg.max_length)
    enc, len_report = encode_pairs(pairs, fmt, max_drop_fraction=cfg.max_drop_fraction)
    log.info("train_bt mode=%s pairs=%d dropped_too_long=%d device=%s", cfg.mode, len(enc), len_report.n_dropped,
             accelerator.device)
    run_log = RunLog(out / LOG_FILE)
    run_log.write(event="start", config=dataclasses.asdict(cfg), pairs=len(enc), load=load_report,
                  too_long=len_report.to_dict())
    peft_model = None
    try:
        if cfg.mode == "frozen":
            steps, last, raw = _train_frozen(cfg, accelerator, rm, enc, run_log)
        else:
            steps, last, peft_model = _train_backbone(cfg, accelerator, rm, enc, run_log)
            raw = _raw_rewards(rm, enc, cfg.feature_batch_tokens)
        n = len(enc)
        train_stats = pair_stats(raw[:n], raw[n:])
        rm.meta.norm_mean, rm.meta.norm_std = float(raw.mean()), float(raw.std().clamp(min=1e-6))
        metrics: dict[str, Any] = {"train_loss_last": last["loss"], "train_accuracy": train_stats["accuracy"],
                                   "train_margin_raw": train_stats["margin"], "steps": steps,
                                   "train_pairs": n, "seconds": round(time.time() - t0, 1)}
        if cfg.eval_file:
            metrics["eval"] = _evaluate_split(cfg, rm)
        _save(cfg, rm, out, peft_model, command, steps, metrics, train_path, load_report, len_report.to_dict())
        run_log.write(event="end", **{k: v for k, v in metrics.items() if k != "eval"})
    finally:
        run_log.close()
    rm.head_version = f"head-{hashlib.sha256(rm.head.weight.detach().float().cpu().numpy().tobytes()).hexdigest()[:12]}"
    return TrainResult(output_dir=out, rm=rm, metrics=metrics, steps=steps)


def _evaluate_split(cfg: BTConfig, rm: RewardModel) -> dict[str, Any]:
    from rewardkit.training.eval import evaluate

    pairs, _, _ = _load_pairs(cfg.eval_file, "validation", cfg.max_eval_pairs, cfg.seed, cfg.max_drop_fraction)
    return evaluate(rm, pairs, max_length=cfg.max_length, max_tokens=cfg.feature_batch_tokens, probe_fractions=(),
                    progress=not cfg.disable_tqdm).summary()


def _save(cfg: BTConfig, rm: RewardModel, out: Path, peft_model: Any, command: str | None, steps: int,
          metrics: dict[str, Any], train_path: Path, load_report: dict[str, Any], too_long: dict[str, Any]) -> None:
    import shutil

    backbone, gguf = _backbone_reference(cfg, rm)
    if cfg.mode == "full":
        model: Any = peft_model.merge_and_unload() if peft_model is not None else rm.model
        model.save_pretrained(out / "backbone", safe_serialization=True)
        rm.tokenizer.save_pretrained(out / "backbone")
        backbone, gguf = "backbone", None
    if cfg.mode == "lora":
        peft_model.save_pretrained(str(out / ckpt.ADAPTER_DIR), safe_serialization=True)
    elif (Path(cfg.model) / ckpt.ADAPTER_DIR).is_dir() and cfg.mode == "frozen":
        shutil.copytree(Path(cfg.model) / ckpt.ADAPTER_DIR, out / ckpt.ADAPTER_DIR, dirs_exist_ok=True)
    head_state = {"weight": rm.head.weight.detach().float().cpu()}
    if rm.head.bias is not None:
        head_state["bias"] = rm.head.bias.detach().float().cpu()
    provenance = {
        "trainer": "bt", "mode": cfg.mode, "command": command or shlex.join(sys.argv), "seed": cfg.seed,
        "train_file": str(train_path), "train_sha256": _file_sha256(train_path), "steps": steps,
        "load_report": load_report, "dropped_too_long": too_long, "metrics": metrics,
        "config": dataclasses.asdict(cfg), "torch": torch.__version__,
    }
    meta = ckpt.CheckpointMeta(
        backbone=backbone, gguf_file=gguf, model_id=cfg.model_id or out.resolve().name,
        norm_mean=rm.meta.norm_mean, norm_std=rm.meta.norm_std, reward_token_rule=rm.meta.reward_token_rule,
        trained=True, description=f"Bradley-Terry reward model ({cfg.mode}) trained by rewardkit train bt",
        provenance=provenance)
    ckpt.save_checkpoint(out, head_state, meta)
    rm.meta = meta
    rm.model_id = meta.model_id
    ckpt.atomic_write_bytes(out / RESULT_FILE, json.dumps(metrics, indent=2, sort_keys=True).encode())
