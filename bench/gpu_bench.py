"""GPU readiness (issue 19): Llama-3.2-1B- and Llama-3.1-8B-shaped reward models (random weights, bf16) served by
rewardkit and by the naive serve_rm-like server on one NVIDIA GPU, same load, one run. Run by ``bench/gpu.sh``.

    python3 bench/gpu_bench.py                      # on the GPU machine: 1b and 8b, ~8 min
    python3 bench/gpu_bench.py --smoke              # tiny shape on whatever device there is (CI runs this on CPU)

Per shape: the bf16 matmul peak of this device (8192^3, mean of 10 after 3 warm-ups), a parity check in bf16
(rewardkit's batched and prefix-shared paths against single-item forwards of the HF model; the same body with a
pooled read-out through the KV cache), then GRPO-shaped
single-item requests (K = 8, prompts ~4x completions, ``--concurrency`` in flight, Python client on the host's
cores) against both servers. Prints and writes (bench/results/gpu.json) tokens/s, MFU = 2 x non-embedding params x
tokens/s / peak, p50/p99 and the ratio to the naive server.

The models are random: numbers measure serving, not reward quality. The tokenizer is the test suite's small BPE
(vocab 512), so a word is a few tokens; the embedding is small and does not count in MFU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, drive, grpo_workload, python, start_process, stop_process, write_json  # noqa: E402

SHAPES = {  # hidden, intermediate, layers, heads, kv heads
    "1b": (2048, 8192, 16, 32, 8),  # Llama-3.2-1B
    "8b": (4096, 14336, 32, 32, 8),  # Llama-3.1-8B
    "smoke": (64, 128, 2, 4, 2),
}


def matmul_peak(device: str, dtype: Any, n: int) -> float:
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync()
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12  # TFLOP/s


def build(out: Path, shape: str, device: str, dtype: Any) -> tuple[Path, int]:
    """A random LlamaForSequenceClassification of ``shape`` in ``dtype``, initialised on ``device``, saved with the
    test tokenizer. Returns (dir, non-embedding parameter count)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from rewardkit.core.testing import make_tokenizer

    hidden, inter, layers, heads, kv = SHAPES[shape]
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=8192, num_labels=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      torch_dtype=dtype)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForSequenceClassification(cfg)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0 / hidden**0.5)
    model.config.architectures = [type(model).__name__]
    params = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out, params


def parity(model_dir: Path, device: str, dtype: str) -> dict[str, float]:
    """Max |reward difference| of rewardkit's batched and prefix-shared paths vs single-item HF forwards."""
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.loading import load_reward_model
    from rewardkit.core.scoring import Scorer, reference_score

    rm = load_reward_model(model_dir, device=device, dtype=dtype)
    fmt = Formatter(rm.tokenizer, max_length=2048)
    pairs = grpo_workload(3, 4, (60, 100), (10, 30), seed=5)
    encs = [fmt.encode(ScoreItem(prompt=p, response=c)) for p, c in pairs]
    ref = [reference_score(rm, e) for e in encs]
    out = {}
    for name, scorer in (("batched", Scorer(rm, prefix_sharing=False)), ("prefix_shared", Scorer(rm)),
                         ("kv_cache", Scorer(rm, prefix_cache_bytes=1 << 30))):
        got = [s.reward for s in scorer.score(encs)]
        out[name] = max(abs(a - b) for a, b in zip(got, ref, strict=True))
    out["reward_scale"] = statistics.pstdev(ref) or 1.0
    out.update(parity_pooled(model_dir, device, dtype, encs))
    return out


def parity_pooled(model_dir: Path, device: str, dtype: str, encs: list[Any]) -> dict[str, float]:
    """The default model's kind of read-out (the mean of a middle layer over the response; no LL term, the random
    model's LM head is not tied) over the same body: the KV-cache path, items one per batch and all in one batch,
    against single unpadded forwards."""
    from rewardkit.core.loading import load_reward_model
    from rewardkit.core.scoring import Scorer, reference_score
    from rewardkit.core.testing import make_readout_checkpoint

    base = load_reward_model(model_dir, device=device, dtype=dtype)
    pooled = make_readout_checkpoint(model_dir, model_dir.parent / f"{model_dir.name}-pooled",
                                     layer=base.model.config.num_hidden_layers // 2, ll_weight=0.0,
                                     head_weight=base.head.weight)
    del base
    rm = load_reward_model(pooled, device=device, dtype=dtype)
    ref = [reference_score(rm, e) for e in encs]
    one, batch = Scorer(rm, prefix_cache_bytes=1 << 30), Scorer(rm, prefix_cache_bytes=1 << 30)
    got_one = [one.score([e])[0].reward for e in encs]
    got_batch = [s.reward for b in (encs[:1], encs[1:]) for s in batch.score(b)]  # the second batch: hits, batched
    assert one.kv is not None and batch.kv is not None
    return {"pooled_kv_one_per_batch": max(abs(a - b) for a, b in zip(got_one, ref, strict=True)),
            "pooled_kv_batched": max(abs(a - b) for a, b in zip(got_batch, ref, strict=True)),
            "pooled_kv_hits": float(one.kv.stats.hits + batch.kv.stats.hits),
            "pooled_reward_scale": statistics.pstdev(ref) or 1.0}


def serve_bench(model_dir: Path, params: int, device: str, dtype: str, conc: int, n_items: int, peak: float,
                tmp: Path, shape: str) -> list[dict[str, Any]]:
    from rewardkit.core.formatting import Formatter, ScoreItem
    from rewardkit.core.testing import make_tokenizer

    fmt = Formatter(make_tokenizer(), max_length=4096)
    texts = [fmt.render(ScoreItem(prompt=p, response=c))[0]
             for p, c in grpo_workload(max(1, n_items // 8), 8, (100, 160), (20, 40), seed=11)]
    tokens = sum(fmt.encode(ScoreItem(text=t)).num_tokens for t in texts)
    margs = ["--model", str(model_dir), "--device", device, "--dtype", dtype]
    rows = []
    for label, cmd, port in (
            ("naive (serve_rm-like)", [python(), str(ROOT / "bench/naive_server.py"), "--model", str(model_dir),
                                       "--port", "8761", "--device", device, "--dtype", dtype], 8761),
            ("rewardkit", [python(), "-m", "rewardkit.cli", "serve", *margs, "--port", "8762", "--max-length", "4096",
                           "--max-batch-tokens", "65536"], 8762)):
        url = f"http://127.0.0.1:{port}"
        proc = start_process(cmd, url, tmp / f"{shape}-{port}.log", timeout=600)
        try:
            asyncio.run(drive(url, texts[:conc], conc))  # warm-up on the first items; the rest are new to the server
            res = asyncio.run(drive(url, texts[conc:], conc))
        finally:
            stop_process(proc)
        served = tokens * (len(texts) - conc) / len(texts)
        tps = served / res["wall_s"]
        rows.append({"shape": shape, "server": label, "tokens_per_s": tps, "requests": res["requests"],
                     "p50_ms": 1e3 * res["p50_s"], "p99_ms": 1e3 * res["p99_s"],
                     "mfu": 2 * params * tps / (peak * 1e12)})
    for r in rows:
        r["ratio_vs_naive"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{shape:>5} | {r['server']:<22} | {r['tokens_per_s']:10.0f} tok/s | MFU {r['mfu']:.3f} | "
              f"p50 {r['p50_ms']:8.1f} ms | p99 {r['p99_ms']:8.1f} ms | x{r['ratio_vs_naive']:.2f}", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="1b,8b")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--items", type=int, default=1024, help="single-item requests per server (after warm-up)")
    ap.add_argument("--smoke", action="store_true", help="the tiny shape on this machine's device, small load")
    ap.add_argument("--json", default=str(ROOT / "bench/results/gpu.json"))
    a = ap.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.smoke:
        a.shapes, a.items, a.concurrency = "smoke", 48, 8
    elif device != "cuda":
        raise SystemExit("no CUDA device: run with --smoke to check the script on CPU")
    dtype_name = "bfloat16"
    dtype = torch.bfloat16
    t0 = time.time()
    peak = matmul_peak(device, dtype, 512 if a.smoke else 8192)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                           "torch": torch.__version__, "bf16_matmul_peak_tflops": peak, "shapes": {}}
    print(f"bf16 matmul peak: {peak:.1f} TFLOP/s on {out['device']}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="rk-gpu-"))
    for shape in a.shapes.split(","):
        ts = time.time()
        model_dir, params = build(tmp / shape, shape, device, dtype)
        par = parity(model_dir, device, dtype_name)
        print(f"{shape:>5} | params {params / 1e9:.2f} B | parity max |diff| batched {par['batched']:.2e}, "
              f"prefix {par['prefix_shared']:.2e}, kv cache {par['kv_cache']:.2e} (reward std "
              f"{par['reward_scale']:.2e}); pooled read-out kv cache {par['pooled_kv_one_per_batch']:.2e} one per "
              f"batch, {par['pooled_kv_batched']:.2e} batched, {par['pooled_kv_hits']:.0f} hits", flush=True)
        rows = serve_bench(model_dir, params, device, dtype_name, a.concurrency, a.items, peak, tmp, shape)
        out["shapes"][shape] = {"non_embedding_params": params, "parity": par, "rows": rows, "wall_s": time.time() - ts}
        write_json(Path(a.json), out)  # partial results survive a later shape's failure
    out["wall_s"] = time.time() - t0
    write_json(Path(a.json), out)
    print(f"wall {out['wall_s']:.0f} s; wrote {a.json}")


if __name__ == "__main__":
    main()
