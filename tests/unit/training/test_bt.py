"""BT trainer on a tiny Llama: frozen / LoRA / full modes, run log, determinism, checkpoint round trip (in process
and over HTTP through the app), config validation."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import RewardModel, load_reward_model
from rewardkit.core.scoring import Scorer
from rewardkit.training.bt import LOG_FILE, train_bt
from rewardkit.training.config import BTConfig


def _rows(n: int = 24) -> list[dict[str, object]]:
    rows = []
    for i in range(n):
        a, b = 3 + i, 11 + 2 * i
        rows.append({"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}. I hope this helps!",
                     "rejected": f"{a} + {b} = {a + b + 1}.", "task": {"family": "arithmetic" if i % 2 else "sum"}})
    return rows


@pytest.fixture(scope="module")
def train_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _rows()), encoding="utf-8")
    return path


def _cfg(model: Path, train_file: Path, out: Path, **kw: object) -> BTConfig:
    base: dict[str, object] = dict(model=str(model), train_file=str(train_file), output_dir=str(out), device="cpu",
                                   num_epochs=4, batch_size=8, learning_rate=5e-2, logging_steps=1, disable_tqdm=True,
                                   max_length=64, seed=3)
    base.update(kw)
    return BTConfig(**base)  # type: ignore[arg-type]


_PROBES = [ScoreItem(prompt="What is 3 + 11?", response="3 + 11 = 14."),
           ScoreItem(prompt="What is 2 + 2?", response="It is 5, I hope this helps!"),
           ScoreItem(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there"}])]


def _scores(rm: RewardModel) -> list[float]:
    fmt = Formatter(rm.tokenizer, max_length=64)
    return [s.reward for s in Scorer(rm).score_batch([fmt.encode(it, i) for i, it in enumerate(_PROBES)])]


def _http_scores(out: Path) -> list[float]:
    from rewardkit.server.app import create_app
    from rewardkit.server.settings import Settings

    items = [{"prompt": p.prompt, "response": p.response} if p.prompt else {"messages": p.messages} for p in _PROBES]
    with TestClient(create_app(Settings(model=str(out), max_length=64))) as client:
        deadline = time.monotonic() + 60
        while client.get("/ready").status_code != 200:  # the app loads the model from disk in the background
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.05)
        r = client.post("/v1/rewards", json={"items": items})
        assert r.status_code == 200, r.text
        return list(r.json()["rewards"])


def test_frozen_trains_logs_and_round_trips(tiny_llama_dir: Path, train_file: Path, tmp_path: Path) -> None:
    before = load_reward_model(tiny_llama_dir).head.weight.detach().clone()
    res = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "a"), command="test")
    log_lines = [json.loads(x) for x in (tmp_path / "a" / LOG_FILE).read_text().splitlines()]
    steps = [x for x in log_lines if "step" in x and "loss" in x]
    assert len(steps) == res.steps == math.ceil(24 / 8) * 4
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # zero-initialised head
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert not torch.equal(res.rm.head.weight, before.to(res.rm.head.weight.dtype))
    # normalisation computed on the training data's rewards: the training rewards are standardised
    meta = json.loads((tmp_path / "a" / "rewardkit.json").read_text())
    assert meta["norm_std"] > 0 and meta["provenance"]["seed"] == 3 and meta["provenance"]["steps"] == res.steps
    assert len(meta["provenance"]["train_sha256"]) == 64 and meta["provenance"]["command"] == "test"
    # trained -> saved -> loaded: same scores, in process and over HTTP
    loaded = load_reward_model(tmp_path / "a")
    assert loaded.meta.norm_mean == pytest.approx(res.rm.meta.norm_mean)
    ours = _scores(res.rm)
    assert _scores(loaded) == pytest.approx(ours, rel=1e-4, abs=1e-5)
    assert _http_scores(tmp_path / "a") == pytest.approx(ours, rel=1e-4, abs=1e-5)
    assert len(set(round(x, 4) for x in ours)) == len(ours)  # the head discriminates


def test_seed_determinism(tiny_llama_dir: Path, train_file: Path, tmp_path: Path) -> None:
    a = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "a", num_epochs=2))
    b = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "b", num_epochs=2))
    c = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "c", num_epochs=2, seed=4))
    assert torch.equal(a.rm.head.weight, b.rm.head.weight)
    assert not torch.equal(a.rm.head.weight, c.rm.head.weight)


def test_feature_cache_reused(tiny_llama_dir: Path, train_file: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "a", num_epochs=1, feature_cache_dir=str(cache)))
    files = list(cache.glob("features-*.safetensors"))
    assert len(files) == 1
    b = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "b", num_epochs=1, feature_cache_dir=str(cache)))
    assert list(cache.glob("features-*.safetensors")) == files
    assert torch.equal(a.rm.head.weight, b.rm.head.weight)


def test_lora_changes_every_trainable_param_and_round_trips(tiny_llama_dir: Path, train_file: Path,
                                                            tmp_path: Path) -> None:
    res = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "l", mode="lora", lora_r=4, num_epochs=1,
                        learning_rate=1e-2))
    assert (tmp_path / "l" / "adapter" / "adapter_model.safetensors").is_file()
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "l" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero in peft: every one moved
    base = load_reward_model(tiny_llama_dir)
    assert not torch.equal(res.rm.head.weight, base.head.weight)
    loaded = load_reward_model(tmp_path / "l")
    assert _scores(loaded) == pytest.approx(_scores(res.rm), rel=1e-4, abs=1e-5)
    assert _scores(loaded) != pytest.approx(_scores(base), rel=1e-3)
    # serving merges the adapter with torch alone (no peft at serve time): the same weights as peft's own merge
    from peft import PeftModel

    ref = load_reward_model(tiny_llama_dir)
    peft_merged = PeftModel.from_pretrained(ref.model, str(tmp_path / "l" / "adapter")).merge_and_unload()
    ours = dict(loaded.model.named_parameters())
    for name, p in peft_merged.named_parameters():
        if name in ours and not name.startswith(("score", "classifier")):
            assert torch.allclose(ours[name], p, atol=1e-6), name


def test_full_finetune_round_trips(tiny_llama_dir: Path, train_file: Path, tmp_path: Path) -> None:
    base = load_reward_model(tiny_llama_dir)
    res = train_bt(_cfg(tiny_llama_dir, train_file, tmp_path / "f", mode="full", num_epochs=1, learning_rate=1e-3))
    changed = [not torch.equal(p, q) for p, q in zip(res.rm.model.parameters(), base.model.parameters(), strict=True)]
    assert sum(changed) >= len(changed) - 1  # every parameter that gets a gradient moved
    assert (tmp_path / "f" / "backbone" / "config.json").is_file()
    loaded = load_reward_model(tmp_path / "f")
    assert _scores(loaded) == pytest.approx(_scores(res.rm), rel=1e-4, abs=1e-5)


def test_margin_column_is_used(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({**r, "margin": 5.0}) + "\n" for r in _rows(8)), encoding="utf-8")
    res = train_bt(_cfg(tiny_llama_dir, path, tmp_path / "m", num_epochs=1, logging_steps=1))
    first = json.loads((tmp_path / "m" / LOG_FILE).read_text().splitlines()[1])
    assert first["loss"] == pytest.approx(math.log1p(math.exp(5.0)), rel=1e-5)  # zero head: -log sigmoid(-5)
    assert res.steps == 1


@pytest.mark.parametrize("field,value,match", [
    ("train_file", "", "train_file is required"),
    ("mode", "qlora", "mode must be one of"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("learning_rate", 0.0, "learning_rate must be > 0"),
    ("warmup_ratio", 1.0, "warmup_ratio"),
])
def test_config_validation_names_field(tmp_path: Path, field: str, value: object, match: str) -> None:
    cfg = BTConfig(train_file="x.jsonl", output_dir=str(tmp_path))
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_cli_registers_train_bt_and_eval() -> None:
    from rewardkit.cli import build_parser

    args = build_parser().parse_args(["train", "bt", "--train-file", "t.jsonl", "--output-dir", "o",
                                      "--learning-rate", "0.5", "--no-disable-tqdm"])
    from rewardkit.training.config import config_from_args

    cfg = config_from_args(BTConfig, args)
    assert cfg.learning_rate == 0.5 and cfg.disable_tqdm is False and cfg.mode == "frozen"
    assert build_parser().parse_args(["eval", "--data", "d"]).func.__name__ == "_run_eval"
