"""The baseline for `score_bench.py`: a reward model behind FastAPI the way many RLHF repos serve one.

One forward pass per request, run synchronously inside an `async def` handler (so the event
loop waits on the model), no batching across requests, no queue. It speaks the same
`POST /v1/score` JSON as the reward service so one load generator drives both.

    python bench/naive_server.py --checkpoint arith/checkpoints/orm --port 8100

This is a benchmark baseline, not an example to copy: STYLE.md lists "a synchronous model
forward inside an `async def` handler" as an anti-pattern, and this file exists to measure it.
"""

from __future__ import annotations

import argparse

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer


class Item(BaseModel):
    id: str
    prompt: str
    response: str


class ScoreRequest(BaseModel):
    reward: str
    items: list[Item]


def create_app(checkpoint: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    app = FastAPI()

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ok"}

    @app.post("/v1/score")
    async def score(req: ScoreRequest) -> dict:
        results = []
        for item in req.items:
            with torch.no_grad():
                inputs = tokenizer(item.prompt + item.response, return_tensors="pt")
                logit = model(**inputs).logits[0, 0]  # [1, 1] -> scalar
            results.append({"id": item.id, "score": torch.sigmoid(logit).item()})
        return {"reward": req.reward, "results": results}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="sequence-classification checkpoint folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    uvicorn.run(create_app(args.checkpoint), host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
