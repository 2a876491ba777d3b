"""Length-aware batching through the real service: concurrent requests of mixed-length items share
batches formed by length, and every item gets the score it gets alone, in its own place."""

from __future__ import annotations

import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from assay.arith.world import take
from assay.checkpoints import ARITH_DIR
from assay.rm_server.backends.hf import TransformersBackend
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ScoreResponse
from assay.rm_server.server import BackgroundServer

pytestmark = pytest.mark.service

ORM = ARITH_DIR / "orm"


def mixed_items(n: int) -> list[dict]:
    """Prompts with responses of 1 to 6 worked solutions strung together: 20 to about 250 characters
    (the ORM's tokenizer has one token per character), in shuffled order."""
    problems = take("train", n + 6, seed=3)
    rng = random.Random(5)
    items = []
    for k in range(n):
        response = " ".join(p.solution for p in problems[k : k + rng.randint(1, 6)])[:230]
        items.append({"id": f"i{k}", "prompt": problems[k].prompt, "response": response})
    return items


def batches_run(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(v) for v in re.findall(r'^assay_rm_batch_items_count\{reward="orm"\} (\S+)$', text, re.M))


def test_mixed_length_items_score_as_they_do_alone_each_in_its_own_place(tmp_path, one_torch_thread):
    spec = tmp_path / "rewards.yaml"
    # Four items or 600 padded tokens per forward; the oldest waits up to 0.3 s for company, so the
    # concurrent requests below meet in the queue and their items are batched by length.
    spec.write_text(
        f"rewards:\n  orm: {{type: model.outcome, path: {ORM}, max_tokens: 256, max_batch_items: 4, "
        "max_batch_tokens: 600, max_wait_ms: 300}\n"
    )
    items = mixed_items(32)
    requests = [items[k : k + 4] for k in range(0, len(items), 4)]
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as server:
        url = server.http_url

        def send(batch: list[dict]) -> ScoreResponse:
            r = httpx.post(f"{url}/v1/score", json={"reward": "orm", "items": batch}, timeout=120)
            assert r.status_code == 200, r.text
            return ScoreResponse.model_validate_json(r.content)

        with ThreadPoolExecutor(len(requests)) as pool:
            replies = list(pool.map(send, requests))
        batches = batches_run(url)

    alone = TransformersBackend(ORM, "outcome")
    for request, reply in zip(requests, replies, strict=True):
        assert [r.id for r in reply.results] == [it["id"] for it in request]  # each result in its place
        for it, result in zip(request, reply.results, strict=True):
            ids = alone.tokenizer(it["prompt"] + it["response"])["input_ids"]
            assert result.score == pytest.approx(float(alone.pooled([ids])[0][0]), abs=1e-5)
    assert batches < len(items)  # items shared forwards: the scores above came out of mixed batches
