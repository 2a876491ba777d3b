"""The policy service over real gRPC on loopback: parity with /v1/completions, refusals and their
status codes, auth, overload, cancellation, health and reflection."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from assay.base.auth import ApiKeys
from assay.policy_server import errors
from assay.policy_server.config import BatchSettings, Limits, ServerConfig
from assay.policy_server.grpc_api import SERVICE, describe, start_grpc_server
from assay.policy_server.grpc_convert import generate_response_to_proto
from assay.policy_server.protocol import CompletionResponse, ModelList
from assay.policy_server.server import BackgroundServer
from assay.policy_server.serving import PolicyService
from assay.proto.policy.v1 import policy_pb2 as pb
from assay.proto.policy.v1 import policy_pb2_grpc
from tests.helpers import LoopThread, grpc_served, wait_for

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
Status = grpc.StatusCode


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.grpc_target) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return policy_pb2_grpc.PolicyServiceStub(channel)


def http_generate(server, **fields) -> pb.GenerateResponse:
    """The same request over HTTP /v1/completions, its response put in proto form."""
    body = {"model": "policy", "prompt": PROMPT, "return_token_ids": True, **fields}
    r = httpx.post(f"{server.http_url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return generate_response_to_proto(CompletionResponse.model_validate_json(r.content))


# --- parity with HTTP ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 0, "max_tokens": 40},
        {"temperature": 1.0, "seed": 7, "n": 4, "max_tokens": 24, "logprobs": 3, "top_p": 0.9, "top_k": 20},
        {"temperature": 0.8, "seed": 11, "n": 2, "max_tokens": 30, "logprobs": 0, "stop": ["="]},
    ],
    ids=["greedy", "seeded-logprobs", "stop"],
)
def test_generate_equals_http_completions(server, stub, fields):
    got = stub.Generate(pb.GenerateRequest(model="policy", prompt=PROMPT, **fields), timeout=60)
    assert got == http_generate(server, **fields)  # every token id and logprob, bit for bit
    n, top = fields.get("n", 1), fields.get("logprobs")
    assert [c.index for c in got.choices] == list(range(n)) and got.model == "policy"
    assert got.usage.prompt_tokens == len(got.prompt_token_ids) > 0
    assert got.usage.completion_tokens == sum(len(c.token_ids) for c in got.choices)
    for c in got.choices:
        assert c.token_ids and c.finish_reason != pb.FINISH_REASON_UNSPECIFIED
        assert c.HasField("logprobs") == (top is not None)
        if top is not None:
            assert len(c.logprobs.token_logprobs) == len(c.logprobs.top_logprobs) == len(c.token_ids)
            assert all(len(t.values) == top for t in c.logprobs.top_logprobs)
    if "stop" in fields:
        assert any(c.stop_reason == "=" and "=" not in c.text for c in got.choices)
    if n == 1:
        assert got.choices[0].text == "23+45=68 68-17=51 #### 51"


def test_token_id_prompts_and_seeds_give_the_same_completions(stub):
    req = pb.GenerateRequest(model="policy", prompt=PROMPT, n=3, seed=5, max_tokens=20)
    by_text = stub.Generate(req, timeout=60)
    by_ids = stub.Generate(
        pb.GenerateRequest(model="policy", prompt_token_ids=by_text.prompt_token_ids, n=3, seed=5, max_tokens=20),
        timeout=60,
    )
    assert [c.token_ids for c in by_ids.choices] == [c.token_ids for c in by_text.choices]
    assert len({tuple(c.token_ids) for c in by_text.choices}) > 1  # choice j samples with seed + j


def test_list_models_matches_http(server, stub):
    got = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    want = ModelList.model_validate_json(httpx.get(f"{server.http_url}/v1/models", timeout=10).content)
    assert [(m.name, m.max_model_len, m.weight_version) for m in got.models] == [
        (m.id, m.max_model_len, m.weight_version) for m in want.data
    ]
    assert [m.name for m in got.models] == ["policy", "verifier"] and got.models[0].max_model_len == 256
    generated = stub.Generate(pb.GenerateRequest(model="policy", prompt=PROMPT, max_tokens=2), timeout=60)
    assert generated.weight_version == got.models[0].weight_version == generated.choices[0].weight_version


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"n": 1000}, Status.INVALID_ARGUMENT, "n=1000 is more than the limit of 128"),
        ({"n": 0}, Status.INVALID_ARGUMENT, "n: Input should be greater than or equal to 1"),
        ({"max_tokens": -1}, Status.INVALID_ARGUMENT, "max_tokens: Input should be greater than or equal to 1"),
        ({"max_tokens": 300}, Status.INVALID_ARGUMENT, "this model's context holds 256 tokens"),
        ({"prompt": ""}, Status.INVALID_ARGUMENT, "`prompt` is empty"),
        ({"prompt_token_ids": [1, 2]}, Status.INVALID_ARGUMENT, "send prompt or prompt_token_ids, not both"),
        ({"prompt": "", "prompt_token_ids": [1, 2, 100]}, Status.INVALID_ARGUMENT, "token ids outside [0, 100)"),
        ({"temperature": -0.5}, Status.INVALID_ARGUMENT, "temperature: Input should be greater than or equal to 0"),
        ({"logprobs": 21}, Status.INVALID_ARGUMENT, "logprobs=21 is more than the limit of 20"),
        ({"model": "nope"}, Status.NOT_FOUND, "the model 'nope' does not exist; this server has policy, verifier"),
    ],
)
def test_bad_requests_get_the_right_status_and_a_clear_message(stub, change, status, words):
    req = pb.GenerateRequest(**{"model": "policy", "prompt": PROMPT, "max_tokens": 4, **change})
    err = rpc_error(stub.Generate, req, timeout=30)
    assert err.code() == status and words in err.details(), err.details()
    trailers = dict(err.trailing_metadata())
    assert trailers["error-type"] == ("not_found_error" if status == Status.NOT_FOUND else "invalid_request_error")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.Unauthenticated, Status.UNAUTHENTICATED),
        (errors.PermissionDenied, Status.PERMISSION_DENIED),
        (errors.QueueFull, Status.RESOURCE_EXHAUSTED),
        (errors.DeadlineExceeded, Status.DEADLINE_EXCEEDED),
        (errors.NotReady, Status.UNAVAILABLE),
    ],
)
def test_every_api_error_maps_to_its_status(error, status):
    """Errors the live tests cannot provoke cheaply (a 300 s timeout; no key lacks `generate`)."""
    failure = describe(error("why", code="some_code", retry_after_s=1.5))
    assert (failure.status, failure.message, failure.type) == (status, "why", error.type)
    assert dict(failure.trailers()) == {"error-type": error.type, "error-code": "some_code", "retry-after": "1.500"}


# --- auth, overload and cancellation ---------------------------------------------------------


@pytest.fixture(scope="module")
def tight():
    """A server with keys, 4 sequences per batch and 8 queued at most: easy to fill."""
    config = ServerConfig(
        models=None,
        port=0,
        grpc_port=0,
        api_keys=("gen-key-for-tests:generate",),
        limits=Limits(max_sequences=8),
        batching=BatchSettings(max_sequences=4, max_queue=8, max_wait_s=0.2),
    )
    with BackgroundServer(config) as s, grpc.insecure_channel(s.grpc_target) as ch:
        yield s, policy_pb2_grpc.PolicyServiceStub(ch)


AUTH = (("authorization", "Bearer gen-key-for-tests"),)
SHORT = pb.GenerateRequest(model="policy", prompt=PROMPT, max_tokens=2, temperature=0)


def test_api_keys_guard_every_policy_method(tight):
    server, stub = tight
    for metadata in [None, (("authorization", "Bearer wrong"),), (("authorization", "gen-key-for-tests"),)]:
        for call, arg in [(stub.Generate, SHORT), (stub.ListModels, pb.ListModelsRequest())]:
            err = rpc_error(call, arg, metadata=metadata, timeout=10)
            assert err.code() == Status.UNAUTHENTICATED and "API key" in err.details()
            assert dict(err.trailing_metadata())["error-code"] == "invalid_api_key"
    assert stub.Generate(SHORT, metadata=AUTH, timeout=60).choices[0].text == "23"
    with grpc.insecure_channel(server.grpc_target) as ch:  # health stays open
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_overload_and_client_cancellation(tight):
    """A full queue refuses with RESOURCE_EXHAUSTED and retry-after; cancelling the call that
    fills it drops its waiting sequences and aborts its running ones, freeing the model."""
    server, stub = tight
    registry = server.service.metrics.registry
    aborted = lambda: (
        registry.get_sample_value("assay_policy_sequences_total", {"model": "policy", "finish_reason": "abort"}) or 0.0
    )
    before = aborted()
    long = pb.GenerateRequest(model="policy", prompt=PROMPT, n=8, max_tokens=200, ignore_eos=True)
    call = stub.Generate.future(long, metadata=AUTH, timeout=120)
    wait_for(lambda: server.service.queue_depths()["policy"] == 4, 60, "the long call never filled a batch")
    err = rpc_error(stub.Generate, pb.GenerateRequest(model="policy", prompt=PROMPT, n=5), metadata=AUTH, timeout=10)
    trailers = dict(err.trailing_metadata())
    assert err.code() == Status.RESOURCE_EXHAUSTED and "sequences waiting" in err.details()
    assert float(trailers["retry-after"]) > 0 and trailers["error-code"] == "queue_full"
    assert call.cancel()
    wait_for(lambda: server.service.queue_depths()["policy"] == 0, 60, "the cancelled call's sequences still wait")
    wait_for(lambda: aborted() - before == 4, 60, "the cancelled call's running sequences were not aborted")
    cancelled = {"route": "grpc/Generate", "model": "policy", "code": "499"}
    assert registry.get_sample_value("assay_policy_requests_total", cancelled) == 1
    done = stub.Generate(
        pb.GenerateRequest(model="policy", prompt=PROMPT, n=8, max_tokens=4), metadata=AUTH, timeout=60
    )
    assert len(done.choices) == 8


# --- health and reflection -------------------------------------------------------------------


def test_health_reports_serving_and_reflection_lists_the_service(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE == "assay.policy.v1.PolicyService"
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    (answer,) = reflect.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    assert {SERVICE, "grpc.health.v1.Health"} <= {s.name for s in answer.list_services_response.service}


def test_health_follows_readiness():
    """Before the models are loaded: NOT_SERVING, and Generate answers UNAVAILABLE."""
    service = PolicyService({})
    with LoopThread() as loop, grpc_served(loop, start_grpc_server(service, ApiKeys(), "127.0.0.1", 0, Limits())) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        check = lambda: health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5).status
        assert check() == health_pb2.HealthCheckResponse.NOT_SERVING
        err = rpc_error(policy_pb2_grpc.PolicyServiceStub(ch).Generate, SHORT, timeout=5)
        assert err.code() == Status.UNAVAILABLE and "still loading" in err.details()
        loop.run(service.start())
        assert check() == health_pb2.HealthCheckResponse.SERVING
