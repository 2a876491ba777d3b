"""A poison request in a busy batch: the others all succeed.

A `top_p` or `temperature` of 5e-324 once made `torch.multinomial` raise inside the decode loop,
and every request sharing that batch got a 500. Here innocent completions and chats, sent at once
with poisoned ones (completions, chat, gRPC Generate and a /v1/search), share the policy server's
decode batches (it waits `max_wait_s` for company); every request must succeed, and the poisoned
ones decode greedily. How one sequence's genuine failure stays its own is tested on the backend
(tests/policy_server/test_backend_failures.py): no request a client can send fails a sequence now.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
import torch

from assay.checkpoints import ARITH_DIR
from policy_server.backends.hf import BatchSettings
from policy_server.protocol import ChatCompletionResponse, CompletionResponse, SearchResponse
from policy_server.server import BackgroundServer, ServerConfig
from proto.policy.v1 import policy_pb2, policy_pb2_grpc

pytestmark = pytest.mark.reliability

PROMPT = "Q: 23+45-17 A: "
GREEDY = "23+45=68 68-17=51 #### 51"
INNOCENTS = 16
TINY = 5e-324  # the smallest positive double: 0 in float32


@pytest.fixture(scope="module")
def server():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    config = ServerConfig(port=0, grpc_port=0, models={"policy": ARITH_DIR / "policy"},
                          batching=BatchSettings(max_wait_s=0.5))  # fmt: skip
    with BackgroundServer(config) as s:
        yield s
    torch.set_num_threads(before)


def _post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=120)


def _batches_up_to(url: str) -> dict[float, float]:
    """The decode batches' size histogram: bucket bound -> batches of at most that many sequences."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    buckets = [line for line in text.splitlines() if line.startswith("assay_policy_batch_sequences_bucket")]
    return {float(line.split('le="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1]) for line in buckets}


def test_poisoned_requests_in_a_busy_batch_cost_nobody_their_completion(server):
    url = server.http_url
    innocent = [("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "seed": i})
                for i in range(INNOCENTS // 2)]  # fmt: skip
    innocent += [("/v1/chat/completions", {"model": "policy", "messages": [{"role": "user", "content": "23+45-17"}],
                                           "max_tokens": 30, "seed": i}) for i in range(INNOCENTS // 2)]  # fmt: skip
    poison = [
        ("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "top_p": TINY}),
        ("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "temperature": TINY, "n": 2}),
        ("/v1/chat/completions", {"model": "policy", "messages": [{"role": "user", "content": "23+45-17"}],
                                  "max_tokens": 30, "temperature": TINY}),
        ("/v1/search", {"model": "policy", "prompt": PROMPT, "strategy": "majority", "n": 3, "top_p": TINY,
                        "max_tokens": 30}),
    ]  # fmt: skip

    def generate_over_grpc() -> policy_pb2.GenerateResponse:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            return stub.Generate(policy_pb2.GenerateRequest(model="policy", prompt=PROMPT, max_tokens=30, top_p=TINY),
                                 timeout=120)  # fmt: skip

    with ThreadPoolExecutor(len(innocent) + len(poison) + 1) as pool:
        grpc_reply = pool.submit(generate_over_grpc)
        replies = list(pool.map(lambda call: _post(url, *call), innocent + poison))

    for (route, _), r in zip(innocent + poison, replies, strict=True):
        assert r.status_code == 200, (route, r.status_code, r.text)
    *_, top_p, temperature, chat, search = replies
    assert [c.text for c in CompletionResponse.model_validate_json(top_p.content).choices] == [GREEDY]
    assert [c.text for c in CompletionResponse.model_validate_json(temperature.content).choices] == [GREEDY] * 2
    ChatCompletionResponse.model_validate_json(chat.content)
    assert all(c.text == GREEDY for c in SearchResponse.model_validate_json(search.content).candidates)
    assert [c.text for c in grpc_reply.result().choices] == [GREEDY]
    batches = _batches_up_to(url)
    assert batches[8.0] < batches[float("inf")], batches  # they met: a batch held more than 8 sequences
