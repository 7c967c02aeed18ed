"""R2M in a GRPO loop, TRL-style: K completions per prompt, R2M rewards from the server, feedback streamed back.

What a trainer does each step (the policy update itself is left out: plug in your GRPO step):

1. generate K completions per prompt (TRL: ``num_generations``) and keep the policy's last-layer hidden states
   with a forward hook (``HiddenStateCapture``) on the forward pass over prompt+completion;
2. ``r2m_rewards``: rewards from the server's active R2M head for those items + hidden states (the response
   names the head version);
3. after the policy step, ``FeedbackStream.add`` each rollout (group id = the prompt's id in this step, round =
   the step number) — the server groups them, forms pseudo-pairs and updates its head in the background.

Run against a server whose policy hidden size matches the policy (here a tiny random Llama, hidden 64)::

    REWARDKIT_R2M_POLICY_HIDDEN_SIZE=64 rewardkit serve --port 8000        # any RM; SmolLM2 by default
    python examples/grpo_r2m.py --url http://127.0.0.1:8000 --steps 3

With a real policy (e.g. SmolLM2-135M-Instruct, hidden 576) set REWARDKIT_R2M_POLICY_HIDDEN_SIZE=576 and pass
the same ``model`` to ``HiddenStateCapture``: it hooks ``model.model.norm``.
"""

from __future__ import annotations

import argparse

import torch

from rewardkit.client.feedback import FeedbackStream, HiddenStateCapture, r2m_rewards

PROMPTS = ["What is 12 + 30?", "Name the capital of France.", "Is 17 a prime number?", "Spell 'cat' backwards."]


def tiny_policy(hidden: int = 64) -> tuple[torch.nn.Module, object]:
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewardkit.core.testing import make_tokenizer

    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="completions per prompt (TRL num_generations)")
    args = ap.parse_args()
    policy, tok = tiny_policy()
    tok.padding_side = "left"  # decoder-only generation; the pads are dropped again by HiddenStateCapture.rows
    with FeedbackStream(args.url, dtype="bfloat16", max_positions=512) as feedback:
        for step in range(args.steps):
            prompts = [p for p in PROMPTS for _ in range(args.k)]  # TRL layout: K copies of each prompt in a row
            enc = tok(prompts, return_tensors="pt", padding=True)
            with torch.no_grad():
                gen = policy.generate(**enc, max_new_tokens=12, do_sample=True, top_k=50,
                                      pad_token_id=tok.pad_token_id)
            completions = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            # the hidden states of the whole query+response: one forward (in training: the policy's last epoch)
            mask = (gen != tok.pad_token_id).long()
            with HiddenStateCapture(policy) as cap, torch.no_grad():
                policy(input_ids=gen, attention_mask=mask)
            per_rollout = HiddenStateCapture.rows(cap.pop(), mask)  # list of (S_i, 64)
            group_ids = [f"step{step}-p{i // args.k}" for i in range(len(prompts))]
            indices = [i % args.k for i in range(len(prompts))]
            items = [{"prompt": p, "response": c} for p, c in zip(prompts, completions, strict=True)]
            out = r2m_rewards(args.url, group_ids, indices, step, per_rollout, items)
            print(f"step {step}: head {out['head_version']} rewards {[round(r, 3) for r in out['rewards'][:4]]} ...")
            # ... the GRPO policy update with out["rewards"] goes here ...
            for g, i, h, r in zip(group_ids, indices, per_rollout, out["results"], strict=True):
                feedback.add(g, i, step, h, rm_item_key=r["item_key"])  # the server kept H_last: no RM forward
            feedback.flush(complete_groups=False)  # groups are complete at K members
    print(f"sent {feedback.frames_sent} frames, {feedback.bytes_sent / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
