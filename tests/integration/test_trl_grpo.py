"""TRL's GRPOTrainer runs a real step with rewardkit's async reward function (the TRL version pinned in `dev`)."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow


def test_grpo_step_with_async_adapter(tiny_llama_dir: Path, tmp_path: Path) -> None:
    trl = pytest.importorskip("trl", reason="TRL is in the `dev` extra: pip install -e '.[dev]'")
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rewardkit.client import AsyncRewardClient
    from rewardkit.client.adapters import make_trl_async_reward_func

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                          bos_token_id=tok.bos_token_id))
    data = Dataset.from_dict({"prompt": [f"What is {i} + {i}?" for i in range(4)]})
    with ServerProcess(tiny_llama_dir, tmp_path, "--max-length", "128") as srv:
        reward = make_trl_async_reward_func(AsyncRewardClient(srv.url), name="rewardkit")
        cfg = trl.GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                             max_completion_length=6, max_steps=1, learning_rate=1e-3, logging_steps=1,
                             report_to=[], save_strategy="no", use_cpu=True, seed=0, bf16=False,
                             dataloader_num_workers=0)
        trainer = trl.GRPOTrainer(model=policy, reward_funcs=[reward], args=cfg, train_dataset=data,
                                  processing_class=tok)
        before = {n: p.detach().clone() for n, p in policy.named_parameters()}
        trainer.train()
        metrics = httpx.get(srv.url + "/metrics").text
    logs = {k: v for entry in trainer.state.log_history for k, v in entry.items()}
    assert trainer.state.global_step == 1
    assert any(k.startswith("rewards/rewardkit") for k in logs), sorted(logs)
    m = re.search(r'rewardkit_requests_total\{endpoint="/v1/rewards",status="200"\} ([0-9.]+)', metrics)
    assert m and float(m.group(1)) >= 1  # the rewards came from the server
    changed = [n for n, p in policy.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "the GRPO step updated no parameter"
