"""The one training loop of every trainer (``rewardkit train bt|rrm|idrm``): run set-up, optimiser, save.

BT, RRM and Id-RM differ only in what one optimiser step computes. Everything around it is here, once:

* :func:`start_run`: seeding, the ``accelerate`` accelerator, the training pairs (seeded subsample), the model,
  the server's formatter and encoded pairs, and the JSONL run log (``DIR/train_log.jsonl``);
* :func:`setup_trainable`: what trains. ``frozen`` = the head only; ``lora`` = peft LoRA adapters on
  ``lora_target_modules`` (``all-linear`` for every linear layer) of ``lora_layers`` (default: every layer) + the
  head; ``full`` = every parameter;
* :func:`optimise`: AdamW (the head at ``head_learning_rate`` when set), linear warm-up and decay, gradient
  accumulation and clipping through the accelerator, a tqdm bar, a run-log line every ``logging_steps``. The caller
  gives ``step_fn(batch) -> (loss, stats)`` for a batch of example indices;
* :func:`finish_run`: reward normalisation over the training rewards, the optional evaluation, the checkpoint
  (head in safetensors + ``rewardkit.json`` with provenance; ``adapter/`` for LoRA, ``backbone/`` for full), the
  result JSON and the head-version hash the server will report.

A checkpoint from any trainer and any mode loads unchanged with :func:`rewardkit.core.loading.load_reward_model`,
so ``rewardkit serve --model DIR`` serves it.

Example (a trainer's skeleton)::

    run = start_run(cfg, trainer="bt")
    peft_model = setup_trainable(cfg, run.rm)
    fwd = RewardForward(run.rm.model, run.rm.head, run.rm.pad_token_id, run.rm.meta.reward_token_rule)
    steps, last, _ = optimise(cfg, run.accelerator, fwd, step_fn, len(run.enc), run.run_log, desc="train bt")
    return finish_run(cfg, run, raw_rewards(run.rm, run.enc, 4096), peft_model, command, steps, last, {})
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import random
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.formatting import Formatter
from rewardkit.core.forward import reward_indices
from rewardkit.core.loading import EMBEDDED_SMOLLM2, RewardModel, check_readout, load_reward_model
from rewardkit.core.loading import head_version as _served_head_version
from rewardkit.core.losses import pair_stats
from rewardkit.training.config import BTConfig, parse_lora_layers, resolve_split
from rewardkit.training.data import PreferencePair, load_preferences
from rewardkit.training.features import EncodedPair, encode_pairs, pair_batches

log = logging.getLogger(__name__)

__all__ = ["LOG_FILE", "RESULT_FILE", "RewardForward", "Run", "RunLog", "StepFn", "TrainResult", "batches_forever",
           "finish_run", "head_version", "load_pairs", "lr_lambda", "make_accelerator", "optimise", "raw_rewards",
           "set_seed", "setup_trainable", "start_run"]

LOG_FILE = "train_log.jsonl"
RESULT_FILE = "train_result.json"

StepFn = Callable[[list[int]], tuple[torch.Tensor, dict[str, float]]]
"""One micro-batch: example indices -> (loss, stats to average into the run log, e.g. accuracy and margin)."""


@dataclasses.dataclass
class TrainResult:
    """What a run produced: the checkpoint directory, the trained model (in memory), metrics and step count."""

    output_dir: Path
    rm: RewardModel
    metrics: dict[str, Any]
    steps: int


class RunLog:
    """Append-only JSONL run log, flushed per line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("w", encoding="utf-8")

    def write(self, **record: Any) -> None:
        self._fh.write(json.dumps(record, sort_keys=True, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()


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


# ---------------------------------------------------------------------------------------------- small pieces


def set_seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def head_version(rm: RewardModel) -> str:
    """The version string the server reports for this head (:func:`rewardkit.core.loading.head_version`)."""
    return _served_head_version(rm.head, rm.meta)


def load_pairs(path: str, split: str, limit: int, seed: int, max_drop_fraction: float
               ) -> tuple[list[PreferencePair], Path, dict[str, Any]]:
    """Pairs of ``split`` (a file, or ``DIR/<split>.jsonl``), a seeded subsample of ``limit`` when set."""
    file = resolve_split(path, split)
    pairs, report = load_preferences(file, max_drop_fraction=max_drop_fraction)
    if limit and limit < len(pairs):
        rng = random.Random(f"rewardkit-bt:{seed}:{split}")
        pairs = rng.sample(pairs, limit)
    return pairs, file, report.to_dict()


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``."""
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


def total_steps(cfg: BTConfig, n_items: int) -> int:
    per_epoch = math.ceil(n_items / cfg.batch_size / cfg.gradient_accumulation_steps)
    return cfg.max_steps or max(1, math.ceil(per_epoch * cfg.num_epochs))


def make_accelerator(cfg: BTConfig) -> Any:
    from accelerate import Accelerator

    cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "no" if cpu else "bf16"
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=cfg.gradient_accumulation_steps)


def batches_forever(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Seeded reshuffle every epoch; the last partial batch of an epoch is kept."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for s in range(0, n, batch_size):
            yield perm[s:s + batch_size]


def pair_margins(enc: Sequence[EncodedPair]) -> torch.Tensor | None:
    """The pairs' ``margin`` column as a tensor, or None when no pair has one."""
    if all(p.pair.margin is None for p in enc):
        return None
    return torch.tensor([p.pair.margin or 0.0 for p in enc], dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- the run


@dataclasses.dataclass
class Run:
    """Everything a trainer starts from (see :func:`start_run`)."""

    cfg: BTConfig
    trainer: str
    accelerator: Any
    out: Path
    rm: RewardModel
    fmt: Formatter
    enc: list[EncodedPair]
    train_path: Path
    load_report: dict[str, Any]
    too_long: dict[str, Any]
    run_log: RunLog
    t0: float

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.run_log.close()  # also on failure; finish_run closes it on success


def start_run(cfg: BTConfig, trainer: str, **start_fields: Any) -> Run:
    """Validate ``cfg``, seed, load pairs and the model, encode, open the run log (its first line: ``event=start``)."""
    cfg.validate()
    t0 = time.time()
    set_seed(cfg.seed)
    accelerator = make_accelerator(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, train_path, load_report = load_pairs(cfg.train_file, "train", cfg.max_train_pairs, cfg.seed,
                                                cfg.max_drop_fraction)
    rm = load_reward_model(cfg.model, device=str(accelerator.device), dtype="float32",
                           reward_token_rule=cfg.reward_token_rule)
    if cfg.mode != "frozen" and not rm.meta.plain_readout:
        raise ValueError(f"model: {cfg.model} reads {rm.meta.readout!r} (layer {rm.meta.readout_layer}, ll_weight "
                         f"{rm.meta.ll_weight}), and mode={cfg.mode!r} trains the reward-token read-out only: start "
                         "from a token read-out, e.g. a frozen run of `rewardkit train bt --model embedded:smollm2` "
                         "(the bare backbone)")
    # the run's own read-out; a frozen head is trained from zero, so an LL weight of the start model is dropped
    rm.meta.readout, rm.meta.readout_layer, rm.meta.ll_weight = cfg.readout, cfg.readout_layer, 0.0
    check_readout(rm.model, dataclasses.replace(rm.meta, ll_weight=1.0 if cfg.ll_feature else 0.0))
    fmt = Formatter(rm.tokenizer, max_length=cfg.max_length)
    enc, len_report = encode_pairs(pairs, fmt, max_drop_fraction=cfg.max_drop_fraction)
    log.info("train_%s mode=%s pairs=%d dropped_too_long=%d device=%s", trainer, cfg.mode, len(enc),
             len_report.n_dropped, accelerator.device)
    run_log = RunLog(out / LOG_FILE)
    run_log.write(event="start", trainer=trainer, config=dataclasses.asdict(cfg), pairs=len(enc), load=load_report,
                  too_long=len_report.to_dict(), **start_fields)
    return Run(cfg=cfg, trainer=trainer, accelerator=accelerator, out=out, rm=rm, fmt=fmt, enc=enc,
               train_path=train_path, load_report=load_report, too_long=len_report.to_dict(), run_log=run_log, t0=t0)


def setup_trainable(cfg: BTConfig, rm: RewardModel, layers: Sequence[int] | None = None) -> Any:
    """Turn gradients on for ``cfg.mode``: the head always; LoRA adapters (on ``layers``, default
    ``cfg.lora_layers`` or every layer) for ``lora``; every parameter for ``full``. Returns the peft model for LoRA,
    else None (``frozen`` and ``full``)."""
    for p in rm.model.parameters():
        p.requires_grad_(cfg.mode == "full")
    peft_model = None
    if cfg.mode == "lora":
        if (Path(cfg.model) / ckpt.ADAPTER_DIR).is_dir():
            raise ValueError("model: LoRA on top of a checkpoint that already has an adapter is not supported; "
                             "start from its backbone, or use mode=frozen")
        from peft import LoraConfig, get_peft_model

        if layers is None:
            layers = parse_lora_layers(cfg.lora_layers)
        targets: Any = [t.strip() for t in cfg.lora_target_modules.split(",") if t.strip()]
        if targets == ["all-linear"]:
            targets = linear_module_names(rm)
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=targets, layers_to_transform=list(layers) if layers else None, bias="none")
        peft_model = get_peft_model(rm.model, lcfg)  # injects adapters into rm.model in place
    for p in rm.head.parameters():
        p.requires_grad_(True)
    return peft_model


def linear_module_names(rm: RewardModel) -> list[str]:
    """The leaf names of every linear layer of the backbone, the reward head excluded (LoRA's ``all-linear``).

    peft's own ``"all-linear"`` leaves out only the LM output embedding, so on a sequence-classification model it
    would wrap the ``score`` head as well; this list never includes it.
    """
    head = rm.head
    names = {name.rsplit(".", 1)[-1] for name, mod in rm.model.named_modules()
             if isinstance(mod, nn.Linear) and mod is not head and not name.startswith(("score", "classifier",
                                                                                       "lm_head"))}
    return sorted(names)


def _mean_stats(window: Sequence[dict[str, float]]) -> dict[str, float]:
    """Per-key mean over the window, skipping NaNs (a batch with no preference pair has no accuracy)."""
    out: dict[str, float] = {}
    for k in window[0]:
        vals = [w[k] for w in window if k in w and not math.isnan(w[k])]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out


def optimise(cfg: BTConfig, accelerator: Any, module: nn.Module, step_fn: StepFn, n_items: int, run_log: RunLog,
             desc: str, head: nn.Module | None = None) -> tuple[int, dict[str, float], float]:
    """The shared optimisation loop over ``n_items`` examples (pairs, or comparisons for RRM).

    Trains the parameters of ``module`` that require gradients; those of ``head`` (a submodule) at
    ``cfg.head_learning_rate`` when it is set. Returns (optimizer steps, last logged stats, seconds per epoch).
    """
    from tqdm.auto import tqdm

    total = total_steps(cfg, n_items)
    params = [p for p in module.parameters() if p.requires_grad]
    head_ids = {id(p) for p in head.parameters()} if head is not None and cfg.head_learning_rate > 0 else set()
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in head_ids]}]
    if head_ids:
        groups.append({"params": [p for p in params if id(p) in head_ids], "lr": cfg.head_learning_rate})
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(total, int(cfg.warmup_ratio * total)))
    opt, sched = accelerator.prepare(opt, sched)
    batches = batches_forever(n_items, cfg.batch_size, cfg.seed)
    step, window = 0, []
    last: dict[str, float] = {"loss": float("nan"), "accuracy": float("nan"), "margin": float("nan")}
    bar = tqdm(total=total, desc=desc, unit="step", disable=cfg.disable_tqdm or not accelerator.is_main_process,
               dynamic_ncols=True)
    module.train()
    t0 = time.perf_counter()
    while step < total:
        for _ in range(cfg.gradient_accumulation_steps):
            with accelerator.accumulate(module):
                loss, stats = step_fn(next(batches))
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad()
            window.append({"loss": float(loss.detach()), **stats})
        step += 1
        if step % cfg.logging_steps == 0 or step == total:
            last = _mean_stats(window)
            lrs = sched.get_last_lr()
            extra = {"head_lr": lrs[-1]} if head_ids and len(lrs) > 1 else {}
            run_log.write(step=step, epoch=step * cfg.batch_size * cfg.gradient_accumulation_steps / n_items,
                          lr=lrs[0], **extra, **last)
            bar.set_postfix(loss=f"{last['loss']:.4f}", acc=f"{last.get('accuracy', float('nan')):.3f}")
            window = []
        bar.update(1)
    bar.close()
    module.eval()
    epochs = total * cfg.batch_size * cfg.gradient_accumulation_steps / max(1, n_items)
    return step, last, (time.perf_counter() - t0) / max(epochs, 1e-9)


@torch.no_grad()
def raw_rewards(rm: RewardModel, enc: Sequence[EncodedPair], max_tokens: int) -> torch.Tensor:
    """Raw (unnormalised) rewards of both sides of every pair through the server's Scorer, (2N,) chosen first."""
    from rewardkit.core.scoring import Scorer

    scorer = Scorer(rm)
    out_c, out_r = torch.zeros(len(enc)), torch.zeros(len(enc))
    for batch in pair_batches(enc, max_tokens):
        s = scorer.score_batch([enc[i].chosen for i in batch] + [enc[i].rejected for i in batch])
        for j, i in enumerate(batch):
            out_c[i], out_r[i] = s[j].raw_reward, s[len(batch) + j].raw_reward
    return torch.cat([out_c, out_r])


def evaluate_split(cfg: BTConfig, rm: RewardModel) -> dict[str, Any]:
    """``cfg.eval_file``'s validation pairs through :func:`rewardkit.training.eval.evaluate`."""
    from rewardkit.training.eval import evaluate

    pairs, _, _ = load_pairs(cfg.eval_file, "validation", cfg.max_eval_pairs, cfg.seed, cfg.max_drop_fraction)
    return evaluate(rm, pairs, max_length=cfg.max_length, max_tokens=cfg.feature_batch_tokens, probe_fractions=(),
                    progress=not cfg.disable_tqdm).summary()


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


def save_checkpoint(run: Run, peft_model: Any, command: str | None, steps: int, metrics: dict[str, Any],
                    description: str, provenance: dict[str, Any]) -> None:
    """Write the rewardkit checkpoint of ``run.rm`` to ``run.out``: head, ``rewardkit.json``, adapter or backbone."""
    cfg, rm, out = run.cfg, run.rm, run.out
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
    prov = {
        "trainer": run.trainer, "mode": cfg.mode, "command": command or shlex.join(sys.argv), "seed": cfg.seed,
        "train_file": str(run.train_path), "train_sha256": file_sha256(run.train_path), "steps": steps,
        "load_report": run.load_report, "dropped_too_long": run.too_long, "metrics": metrics,
        "config": dataclasses.asdict(cfg), "torch": torch.__version__, **provenance,
    }
    meta = ckpt.CheckpointMeta(
        backbone=backbone, gguf_file=gguf, model_id=cfg.model_id or out.resolve().name,
        norm_mean=rm.meta.norm_mean, norm_std=rm.meta.norm_std, reward_token_rule=rm.meta.reward_token_rule,
        trained=True, description=description, provenance=prov, readout=rm.meta.readout,
        readout_layer=rm.meta.readout_layer, ll_weight=rm.meta.ll_weight)
    ckpt.save_checkpoint(out, head_state, meta)
    rm.meta = meta
    rm.model_id = meta.model_id


def finish_run(run: Run, raw: torch.Tensor, peft_model: Any, command: str | None, steps: int,
               last: dict[str, float], metrics: dict[str, Any], description: str = "",
               provenance: dict[str, Any] | None = None) -> TrainResult:
    """Normalise over the training rewards ``raw`` (2N,: chosen then rejected), evaluate, save, close the log.

    ``metrics`` holds the trainer's own entries; the shared ones (train loss and accuracy, steps, pairs, seconds) are
    added here. Returns the :class:`TrainResult`; the model's ``head_version`` is set to the served hash.
    """
    cfg, rm = run.cfg, run.rm
    for p in rm.model.parameters():
        p.requires_grad_(False)
    n = len(run.enc)
    train_stats = pair_stats(raw[:n], raw[n:])
    rm.meta.norm_mean, rm.meta.norm_std = float(raw.mean()), float(raw.std().clamp(min=1e-6))
    metrics = {"train_loss_last": last.get("loss"), "train_accuracy": train_stats["accuracy"],
               "train_margin_raw": train_stats["margin"], "steps": steps, "train_pairs": n, **metrics,
               "seconds": round(time.time() - run.t0, 1)}
    if cfg.eval_file:
        metrics["eval"] = evaluate_split(cfg, rm)
    description = cfg.description or description or f"{run.trainer.upper()} reward model ({cfg.mode}) trained by rewardkit train " \
                                 f"{run.trainer}"
    try:
        save_checkpoint(run, peft_model, command, steps, metrics, description, provenance or {})
        ckpt.atomic_write_bytes(run.out / RESULT_FILE, json.dumps({**metrics, "trainer": run.trainer}, indent=2,
                                                                  sort_keys=True, default=str).encode("utf-8"))
        run.run_log.write(event="end", **{k: v for k, v in metrics.items() if k != "eval"})
    finally:
        run.run_log.close()
    rm.head_version = head_version(rm)
    return TrainResult(output_dir=run.out, rm=rm, metrics=metrics, steps=steps)
