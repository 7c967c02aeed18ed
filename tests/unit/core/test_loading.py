"""Loading: HF dirs, rewardkit checkpoints, refusals with clear messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rewardkit.core import checkpoint as ckpt
from rewardkit.core.errors import ConfigError, ModelLoadError
from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model, resolve_device
from rewardkit.core.scoring import Scorer


def test_device_auto_is_cpu_fp32_here() -> None:
    dev, dt = resolve_device("auto")
    assert (dev.type, dt) == ("cpu", torch.float32) or dev.type == "cuda"
    assert resolve_device("cpu", "bf16")[1] == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_device("cpu", "int3")


def test_checkpoint_round_trip(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base = load_reward_model(tiny_llama_dir)
    w = torch.randn(1, base.hidden_size)
    meta = ckpt.CheckpointMeta(backbone=str(tiny_llama_dir), model_id="my-rm", norm_mean=0.5, norm_std=2.0)
    ckpt.save_checkpoint(tmp_path / "ck", {"weight": w}, meta)
    rm = load_reward_model(tmp_path / "ck")
    assert rm.model_id == "my-rm" and torch.equal(rm.head.weight, w)
    enc = Formatter(rm.tokenizer).encode(ScoreItem(text="hello"))
    s = Scorer(rm).score_batch([enc])[0]
    assert s.reward == pytest.approx((s.raw_reward - 0.5) / 2.0)
    assert s.raw_reward == pytest.approx(float(rm.head(Scorer(rm).score_batch([enc], return_hidden=True)[0].hidden)),
                                         rel=1e-5)


def test_relative_backbone_and_bad_meta(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ck = tmp_path / "ck"
    meta = ckpt.CheckpointMeta(backbone=str(tiny_llama_dir), reward_token_rule="bogus")
    ckpt.save_checkpoint(ck, {"weight": torch.zeros(1, 64)}, ckpt.CheckpointMeta(backbone=str(tiny_llama_dir)))
    (ck / ckpt.META_FILE).write_text(meta.to_json())
    with pytest.raises(ModelLoadError, match="reward_token_rule"):
        load_reward_model(ck)
    (ck / ckpt.META_FILE).write_text(json.dumps({"format_version": 99, "backbone": "x"}))
    with pytest.raises(ModelLoadError, match="upgrade rewardkit"):
        load_reward_model(ck)


def test_head_shape_mismatch(tiny_llama_dir: Path, tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path / "ck", {"weight": torch.zeros(1, 7)}, ckpt.CheckpointMeta(backbone=str(tiny_llama_dir)))
    with pytest.raises(ModelLoadError, match="does not match"):
        load_reward_model(tmp_path / "ck")


def test_num_labels_must_be_one(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "two"
    shutil.copytree(tiny_llama_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_labels"] = 2
    cfg["id2label"] = {"0": "a", "1": "b"}
    cfg["label2id"] = {"a": 0, "b": 1}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="num_labels=1"):
        load_reward_model(d)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot load reward model"):
        load_reward_model(str(tmp_path / "nope"))


def test_atomic_write_leaves_no_temp(tmp_path: Path) -> None:
    ckpt.atomic_write_bytes(tmp_path / "f.bin", b"abc")
    ckpt.atomic_write_bytes(tmp_path / "f.bin", b"def")
    assert (tmp_path / "f.bin").read_bytes() == b"def"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]
