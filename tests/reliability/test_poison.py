"""A poison request in a busy batch: the others all succeed.

A `top_p` or `temperature` of 5e-324 once made `torch.multinomial` raise inside the decode loop,
and every request sharing that batch got a 500. Here innocent completions and chats, sent at once
with poisoned ones (completions, chat, gRPC Generate and a /v1/search), share the policy server's
decode batches (it waits `max_wait_s` for company); every request must succeed, and the poisoned
ones decode greedily. And a sequence that does break (a checkpoint whose embedding of one token is
NaN: a diverged weight push looks like this) fails its own request with a typed error, a 500 in
OpenAI's error shape (`generation_failed`) or gRPC INTERNAL, while its batch-mates get their
completions; the old decode loop failed the whole batch, or silently answered the argmax of NaN.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import pytest
from safetensors.torch import load_file, save_file

from assay.arith.tokenizer import build_tokenizer
from assay.checkpoints import ARITH_DIR
from assay.policy_server.config import BatchSettings, ServerConfig
from assay.policy_server.protocol import ChatCompletionResponse, CompletionResponse, ErrorResponse, SearchResponse
from assay.policy_server.server import BackgroundServer
from assay.proto.policy.v1 import policy_pb2, policy_pb2_grpc

pytestmark = [pytest.mark.reliability, pytest.mark.service, pytest.mark.usefixtures("one_torch_thread")]

PROMPT = "Q: 23+45-17 A: "
GREEDY = "23+45=68 68-17=51 #### 51"
INNOCENTS = 16
TINY = 5e-324  # the smallest positive double: 0 in float32


BROKEN_TOKEN = "~"  # never in an arithmetic prompt or completion


def _serve(checkpoint):
    """The policy server on `checkpoint`, waiting half a second for company: concurrent requests share batches."""
    config = ServerConfig(port=0, grpc_port=0, models={"policy": checkpoint}, batching=BatchSettings(max_wait_s=0.5))
    return BackgroundServer(config)


@pytest.fixture(scope="module")
def server():
    with _serve(ARITH_DIR / "policy") as s:
        yield s


@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """The embedded policy, but the embedding of BROKEN_TOKEN is NaN: any sequence that reads it breaks."""
    path = tmp_path_factory.mktemp("broken") / "policy"
    shutil.copytree(ARITH_DIR / "policy", path)
    weights = load_file(path / "model.safetensors")
    weights["model.embed_tokens.weight"][build_tokenizer().convert_tokens_to_ids(BROKEN_TOKEN)] = float("nan")
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with _serve(path) as s:
        yield s


def _post(url: str, route: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=120)


def _batches_up_to(url: str) -> dict[float, float]:
    """The decode batches' size histogram: bucket bound -> batches of at most that many sequences."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    buckets = [line for line in text.splitlines() if line.startswith("assay_policy_batch_sequences_bucket")]
    return {float(line.split('le="')[1].split('"')[0]): float(line.rsplit(" ", 1)[1]) for line in buckets}


def test_poisoned_requests_in_a_busy_batch_cost_nobody_their_completion(server):
    url = server.http_url
    innocent = [
        ("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "seed": i})
        for i in range(INNOCENTS // 2)
    ]
    innocent += [
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "user", "content": "23+45-17"}], "max_tokens": 30, "seed": i},
        )
        for i in range(INNOCENTS // 2)
    ]
    poison = [
        ("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "top_p": TINY}),
        ("/v1/completions", {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "temperature": TINY, "n": 2}),
        (
            "/v1/chat/completions",
            {
                "model": "policy",
                "messages": [{"role": "user", "content": "23+45-17"}],
                "max_tokens": 30,
                "temperature": TINY,
            },
        ),
        (
            "/v1/search",
            {"model": "policy", "prompt": PROMPT, "strategy": "majority", "n": 3, "top_p": TINY, "max_tokens": 30},
        ),
    ]

    def generate_over_grpc() -> policy_pb2.GenerateResponse:
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            return stub.Generate(
                policy_pb2.GenerateRequest(model="policy", prompt=PROMPT, max_tokens=30, top_p=TINY), timeout=120
            )

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


def test_a_sequence_that_breaks_fails_its_own_request_typed_and_its_batch_mates_succeed(broken_server):
    url = broken_server.http_url
    innocent = [
        (
            "/v1/completions",
            {"model": "policy", "prompt": PROMPT, "max_tokens": 30, "temperature": t, "top_k": 3, "seed": i},
        )
        for i, t in enumerate([0.0, 1.0] * (INNOCENTS // 2))
    ]
    broken = f"Q: 2{BROKEN_TOKEN}3 A: "
    poison = [
        ("/v1/completions", {"model": "policy", "prompt": broken, "max_tokens": 30}),
        ("/v1/completions", {"model": "policy", "prompt": broken, "max_tokens": 30, "temperature": 0}),
        (
            "/v1/chat/completions",
            {"model": "policy", "messages": [{"role": "user", "content": broken}], "max_tokens": 30},
        ),
        ("/v1/search", {"model": "policy", "prompt": broken, "strategy": "majority", "n": 3, "max_tokens": 30}),
    ]

    def generate_over_grpc() -> grpc.StatusCode:
        with grpc.insecure_channel(broken_server.grpc_target) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            try:
                stub.Generate(policy_pb2.GenerateRequest(model="policy", prompt=broken, max_tokens=30), timeout=120)
            except grpc.RpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    with ThreadPoolExecutor(len(innocent) + len(poison) + 1) as pool:
        grpc_status = pool.submit(generate_over_grpc)
        replies = list(pool.map(lambda call: _post(url, *call), innocent + poison))

    for (route, _), r in zip(innocent, replies, strict=False):
        assert r.status_code == 200, (route, r.status_code, r.text)
        assert all(BROKEN_TOKEN not in c.text for c in CompletionResponse.model_validate_json(r.content).choices)
    for (route, _), r in zip(poison, replies[len(innocent) :], strict=True):
        assert r.status_code == 500, (route, r.status_code, r.text)
        error = ErrorResponse.model_validate_json(r.content).error
        assert (error.type, error.code) == ("server_error", "generation_failed"), (route, error)
        assert "NaN" in error.message, error.message
    assert grpc_status.result() == grpc.StatusCode.INTERNAL
    batches = _batches_up_to(url)
    assert batches[8.0] < batches[float("inf")], batches  # they met: a batch held more than 8 sequences
