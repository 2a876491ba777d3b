"""Test double: an OpenAI-compatible completions and chat server backed by the embedded verifier.

It stands in for an OpenAI-compatible judge. `POST /v1/completions` continues each prompt
greedily (temperature 0) with a real model and answers with real logprobs (log_softmax of its
logits), in the legacy completions shape vLLM and OpenAI use: `choices[i].text`,
`choices[i].logprobs.{tokens, token_logprobs, top_logprobs, text_offset}`, `finish_reason`,
`usage`. `POST /v1/chat/completions` does the same for a conversation, answering in the chat shape
(`choices[0].message.content`, `choices[0].logprobs.content[i].{token, logprob, top_logprobs}`).

It is a double, not a chat model: the verifier's own chat template turns a user turn into an
arithmetic question (`Q: ... A: `), which cannot hold a judge's rubric, so the double renders a
conversation as the plain concatenation of its messages' contents. A chat judge whose system
message is empty and whose user template is the verifier's format (`{prompt}{response}\nCorrect? `)
therefore sends the verifier exactly what the completions API would, and must get the same score;
the real policy server renders with the checkpoint's template instead.

Any model name other than the served one gets a 404. Every request's headers and body are
appended to `app.state.requests`, for tests to inspect.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MODEL_NAME = "verifier"


@torch.inference_mode()
def complete(model, tokenizer, prompt: str, max_tokens: int, top_k: int) -> dict:
    """One greedy continuation as an OpenAI `choices[i]` dict (index filled in by the caller)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, seq], starts with <s>
    n_prompt = ids.shape[1]
    tokens, token_lps, tops, offsets, text, reason = [], [], [], [], "", "length"
    for _ in range(max_tokens):
        logp = model(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1)  # [vocab]
        choice = int(logp.argmax())
        piece = tokenizer.decode([choice])  # "</s>" for eos: listed in logprobs, kept out of text
        tokens.append(piece)
        token_lps.append(float(logp[choice]))
        offsets.append(len(prompt) + len(text))
        if top_k:
            values, idx = logp.topk(top_k)
            tops.append({tokenizer.decode([int(i)]): float(v) for v, i in zip(values, idx)})
        if choice == tokenizer.eos_token_id:
            reason = "stop"
            break
        text += piece
        ids = torch.cat([ids, torch.tensor([[choice]])], dim=1)
    logprobs = {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
    return {
        "text": text,
        "logprobs": logprobs if top_k else None,
        "finish_reason": reason,
        "n_prompt": n_prompt,
        "n_out": len(tokens),
    }


def judge_app(model=None, tokenizer=None, model_name: str = MODEL_NAME) -> FastAPI:
    """The double's app; loads the embedded verifier unless a model and tokenizer are given."""
    if model is None:
        from assay.checkpoints import load_embedded

        model, tokenizer = load_embedded("verifier")  # (model in eval mode, tokenizer)
    app = FastAPI()
    app.state.requests = []
    lock = threading.Lock()  # one forward at a time: the tiny model needs no more

    def run(prompt: str, max_tokens: int, top_k: int) -> dict:
        with lock:
            return complete(model, tokenizer, prompt, max_tokens, top_k)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "assay-tests"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        app.state.requests.append({"headers": dict(request.headers), "body": body})
        if body.get("model") != model_name:
            message = f"The model `{body.get('model')}` does not exist."
            return JSONResponse({"error": {"message": message, "type": "NotFoundError", "code": 404}}, 404)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        max_tokens, top_k = int(body.get("max_tokens", 16)), int(body.get("logprobs") or 0)
        choices = [await asyncio.to_thread(run, p, max_tokens, top_k) for p in prompts]
        n_prompt = sum(c.pop("n_prompt") for c in choices)
        n_out = sum(c.pop("n_out") for c in choices)
        return {
            "id": f"cmpl-{len(app.state.requests)}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": i, **c} for i, c in enumerate(choices)],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        app.state.requests.append({"headers": dict(request.headers), "body": body})
        if body.get("model") != model_name:
            message = f"The model `{body.get('model')}` does not exist."
            return JSONResponse({"error": {"message": message, "type": "NotFoundError", "code": 404}}, 404)
        prompt = "".join(m["content"] for m in body["messages"])  # the double's template: see the docstring
        top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else 0
        out = await asyncio.to_thread(run, prompt, int(body.get("max_tokens", 16)), top_k)
        logprobs = None
        if body.get("logprobs"):
            lp = out["logprobs"] or {"tokens": [], "token_logprobs": [], "top_logprobs": []}
            content = []
            for i, (token, value) in enumerate(zip(lp["tokens"], lp["token_logprobs"])):
                tops = lp["top_logprobs"][i] if lp["top_logprobs"] else {}
                alternatives = [{"token": t, "logprob": v} for t, v in tops.items()]
                content.append({"token": token, "logprob": value, "top_logprobs": alternatives})
            logprobs = {"content": content}
        message = {"role": "assistant", "content": out["text"]}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": out["finish_reason"]}
        usage = {"prompt_tokens": out["n_prompt"], "completion_tokens": out["n_out"]}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {
            "id": f"chatcmpl-{len(app.state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [choice],
            "usage": usage,
        }

    return app


@contextmanager
def serve(app, port: int = 0) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a background thread; yields `http://127.0.0.1:PORT`."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@contextmanager
def serve_judge_double(port: int = 0, app: FastAPI | None = None) -> Iterator[str]:
    """The double on loopback; yields its OpenAI base URL `http://127.0.0.1:PORT/v1`."""
    with serve(app if app is not None else judge_app(), port) as root:
        yield f"{root}/v1"
