"""A naive baseline shaped like OpenRLHF's ``serve_rm``: one request at a time, padded to its longest item, no
batching across requests. Same model loading and formatting as rewardkit so only the serving strategy differs.

    python bench/naive_server.py --model DIR --port 8100
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from rewardkit.core.formatting import Formatter, ScoreItem
from rewardkit.core.loading import load_reward_model
from rewardkit.core.scoring import Scorer


class Req(BaseModel):
    query: list[str]
    prompts: list[str] | None = None
    labels: list[str] | None = None


def build(model: str | None, max_length: int, device: str = "auto", dtype: str | None = None) -> FastAPI:
    rm = load_reward_model(model, device=device, dtype=dtype)
    fmt = Formatter(rm.tokenizer, max_length=max_length)
    scorer = Scorer(rm, padding_side="left")  # OpenRLHF pads left
    app = FastAPI()

    @app.post("/get_reward")
    async def get_reward(req: Req) -> dict[str, object]:
        # Like serve_rm: the forward runs inside the async handler and blocks the loop, so requests are served one
        # at a time; each request's items are padded to its longest.
        encs = [fmt.encode(ScoreItem(text=q), i) for i, q in enumerate(req.query)]
        with torch.inference_mode():
            rewards = [s.reward for s in scorer.score_batch(encs)]
        return {"rewards": rewards, "scores": rewards, "extra_logs": {}}

    @app.get("/ready")
    async def ready() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    uvicorn.run(build(args.model, args.max_length, args.device, args.dtype), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
