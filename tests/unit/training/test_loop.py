"""The shared training loop (rewardkit.training.loop): every trainer runs it, LoRA placement (all-linear, layer
subsets), the head's own learning rate, and the head version the server reports for a trained checkpoint."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from rewardkit.core.loading import load_reward_model
from rewardkit.training.bt import train_bt
from rewardkit.training.config import BTConfig, parse_lora_layers
from rewardkit.training.loop import LOG_FILE, head_version, setup_trainable

TRAINING = Path(__file__).resolve().parents[3] / "training" / "rewardkit" / "training"


def _data(tmp: Path, n: int = 8) -> Path:
    path = tmp / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 2?", "chosen": f"{i} + 2 = {i + 2}.",
                                        "rejected": f"{i} + 2 = {i + 3}. Hope this helps!"}) + "\n"
                            for i in range(n)), encoding="utf-8")
    return path


def _cfg(model: Path, data: Path, out: Path, **kw: object) -> BTConfig:
    base: dict[str, object] = dict(model=str(model), train_file=str(data), output_dir=str(out), device="cpu",
                                   num_epochs=1, batch_size=4, learning_rate=1e-3, logging_steps=1,
                                   disable_tqdm=True, max_length=64, seed=0)
    base.update(kw)
    return BTConfig(**base)  # type: ignore[arg-type]


def test_trainers_share_the_loop_not_private_imports() -> None:
    """rrm.py and idrm.py take set-up, loop and save from loop.py; nobody imports bt.py's private names."""
    for name in ("bt.py", "rrm.py", "idrm.py"):
        tree = ast.parse((TRAINING / name).read_text())
        froms = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
        assert any(f.module == "rewardkit.training.loop" for f in froms), name
        for f in froms:
            if f.module and f.module.startswith("rewardkit.training."):
                assert not any(a.name.startswith("_") for a in f.names), (name, f.module)
        src = (TRAINING / name).read_text()
        assert "torch.optim.AdamW" not in src or name == "idrm.py"  # idrm's AdamW is the teacher's fine-tuning
        assert "def _optimise" not in src and "RunLog(out / LOG_FILE)" not in src


def test_lora_all_linear_adapts_attention_and_mlp(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    setup_trainable(BTConfig(train_file="x", output_dir="y", mode="lora", lora_r=2,
                             lora_target_modules="all-linear"), rm)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in rm.model.named_parameters() if "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= adapted
    trainable = [n for n, p in rm.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("score") for n in trainable)  # adapters + the head
    assert all(p.requires_grad for p in rm.head.parameters())


def test_lora_layers_restricts_the_adapters(tiny_llama_dir: Path) -> None:
    rm = load_reward_model(tiny_llama_dir)
    setup_trainable(BTConfig(train_file="x", output_dir="y", mode="lora", lora_r=2, lora_layers="1"), rm)
    lora = [n for n, _ in rm.model.named_parameters() if "lora_" in n]
    assert lora and all(".layers.1." in n for n in lora)
    assert parse_lora_layers("all") is None and parse_lora_layers("") is None and parse_lora_layers("0,2") == [0, 2]
    with pytest.raises(ValueError, match="lora_layers"):
        BTConfig(train_file="x", output_dir="y", lora_layers="last").validate()
    with pytest.raises(ValueError, match="head_learning_rate"):
        BTConfig(train_file="x", output_dir="y", head_learning_rate=-1).validate()


def test_head_learning_rate_is_its_own_param_group(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A 100x head rate moves the head further in the same steps, and the run log shows both rates."""
    data = _data(tmp_path)
    slow = train_bt(_cfg(tiny_llama_dir, data, tmp_path / "a", mode="lora", lora_r=2, learning_rate=1e-4))
    fast = train_bt(_cfg(tiny_llama_dir, data, tmp_path / "b", mode="lora", lora_r=2, learning_rate=1e-4,
                         head_learning_rate=1e-2))
    start = load_reward_model(tiny_llama_dir).head.weight.detach()
    d_slow = (slow.rm.head.weight.detach() - start).norm()
    d_fast = (fast.rm.head.weight.detach() - start).norm()
    assert d_fast > 10 * d_slow > 0
    lr_lines = [json.loads(x) for x in (tmp_path / "b" / LOG_FILE).read_text().splitlines() if '"lr"' in x]
    assert lr_lines and lr_lines[0]["head_lr"] == pytest.approx(100 * lr_lines[0]["lr"])  # both decay together
    assert "head_lr" not in json.loads((tmp_path / "a" / LOG_FILE).read_text().splitlines()[1])


def test_checkpoint_head_version_is_what_the_server_reports(tiny_llama_dir: Path, tmp_path: Path) -> None:
    res = train_bt(_cfg(tiny_llama_dir, _data(tmp_path), tmp_path / "c", num_epochs=2))
    loaded = load_reward_model(tmp_path / "c")
    assert res.rm.head_version == head_version(loaded) and res.rm.head_version.startswith("head-")
    from rewardkit.core.loading import load_reward_model as load

    assert load(tmp_path / "c").head_version == res.rm.head_version  # the loader computes the same hash
    meta = json.loads((tmp_path / "c" / "rewardkit.json").read_text())
    assert meta["provenance"]["trainer"] == "bt" and meta["provenance"]["config"]["head_learning_rate"] == 0.0
    result = json.loads((tmp_path / "c" / "train_result.json").read_text())
    assert result["trainer"] == "bt" and result["steps"] == res.steps
    assert torch.isfinite(torch.tensor(result["train_loss_last"]))
