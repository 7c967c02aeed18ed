"""Tiny random-initialised reward models with a locally trained tokenizer, for tests and benchmarks.

Nothing here touches the network. ``make_tiny_reward_model(out_dir, arch)`` writes a plain HF
sequence-classification directory (``num_labels=1``) that ``load_reward_model`` and the server load unchanged.

Example::

    path = make_tiny_reward_model(tmp_path / "rm", arch="llama")
    rm = load_reward_model(path)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Paris, Berlin, Madrid, Rome, Lisbon, Vienna and Warsaw are European capitals.",
    "Twelve plus thirty is forty-two. 12 + 30 = 42. 7 * 8 = 56. 100 - 1 = 99.",
    "Please answer in exactly three words. I hope this helps! Great question.",
    "Convert 3 kilometres to metres: 3 km is 3000 m. One hour has 60 minutes.",
    "- item one\n- item two\n**bold** text and `code` in markdown.",
    "Ünïcödé ñ 日本語 テキスト and émojis 🙂 appear sometimes.",
]


def make_tokenizer(vocab_size: int = 512, chat_template: bool = True) -> Any:
    """A byte-level BPE tokenizer trained in-process on a small corpus (pad == eos, like SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_tiny_reward_model(out_dir: str | Path, arch: str = "llama", hidden: int = 64, layers: int = 2,
                           heads: int = 4, kv_heads: int = 2, seed: int = 0, chat_template: bool = True,
                           tie_embeddings: bool = False) -> Path:
    """Write a tiny random-initialised ``*ForSequenceClassification`` (num_labels=1) + tokenizer to ``out_dir``."""
    import torch
    from transformers import (
        GPT2Config,
        GPT2ForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    out = Path(out_dir)
    tok = make_tokenizer(chat_template=chat_template)
    torch.manual_seed(seed)
    model: Any
    cfg: Any
    config_cls: Any
    if arch == "llama":
        config_cls = LlamaConfig
        cfg = config_cls(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2,
                          num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                          max_position_embeddings=4096, num_labels=1, pad_token_id=tok.pad_token_id,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                          tie_word_embeddings=tie_embeddings)
        model = LlamaForSequenceClassification(cfg)
    elif arch == "gpt2":
        config_cls = GPT2Config
        cfg = config_cls(vocab_size=len(tok), n_embd=hidden, n_layer=layers, n_head=heads, n_positions=4096,
                         num_labels=1, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                         bos_token_id=tok.bos_token_id)
        model = GPT2ForSequenceClassification(cfg)
    else:
        raise ValueError(f"arch must be 'llama' or 'gpt2', got {arch!r}")
    with torch.no_grad():  # a visible, non-trivial head so scores differ between items
        model.score.weight.normal_(0, 1.0 / hidden**0.5)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_readout_checkpoint(base: str | Path, out_dir: str | Path, readout: str = "mean_response", layer: int = 2,
                            ll_weight: float = 0.7, head_weight: Any = None) -> Path:
    """Write a rewardkit checkpoint over the model at ``base`` whose head reads ``readout`` (``"mean_response"``:
    the mean of ``hidden_states[layer]`` over the response) and adds ``ll_weight`` x the LM's log-likelihood
    (norm 0.1 / 2.0), the default model's kind of read-out. ``head_weight``: the head's (1, H) weights (default:
    the base's own score head, loaded on CPU)."""
    from rewardkit.core import checkpoint as ckpt

    if head_weight is None:
        from rewardkit.core.loading import load_reward_model

        head_weight = load_reward_model(base).head.weight
    meta = ckpt.CheckpointMeta(backbone=str(base), model_id="readout", norm_mean=0.1, norm_std=2.0, readout=readout,
                               readout_layer=layer, ll_weight=ll_weight)
    ckpt.save_checkpoint(Path(out_dir), {"weight": head_weight.detach().float().cpu()}, meta)
    return Path(out_dir)
