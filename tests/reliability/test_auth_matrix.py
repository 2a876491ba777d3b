"""Who may do what, over HTTP and gRPC on both services, and what a web page may not do at all.

The authentication matrix runs over every route the OpenAPI schema lists and every method the
gRPC service descriptors list, so a new route or method is in it without being added here: no
key, a wrong key, an under-scoped key and the right key get 401, 401, 403 and through (gRPC:
UNAUTHENTICATED, and through; no gRPC method needs more than the lowest scope, so
PERMISSION_DENIED has no case there). The key is checked before the body is read. Health,
readiness and metrics stay open.

The cross-site half is issue 10's defect 2: on a keyless loopback policy server a web page could
POST a text/plain safetensors body with its own Origin to /v1/admin/weights and replace the
served weights. Now a foreign Origin, a cross-site Sec-Fetch-Site, a rebinding Host and an
undocumented content type are refused, and same-origin and non-browser requests still work.
"""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest
from safetensors.torch import save

from assay.base.auth import MIN_KEY_LENGTH, ApiKeys
from assay.base.http_guard import allowed_hosts
from assay.checkpoints import EMBEDDED, load_embedded
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.policy_server.server import BackgroundServer as PolicyBackground
from assay.policy_server.server import PolicyServer
from assay.proto.policy.v1 import policy_pb2
from assay.proto.reward.v1 import reward_pb2
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.server import BackgroundServer as RewardBackground
from assay.rm_server.server import RewardServer

pytestmark = [pytest.mark.reliability, pytest.mark.service]

OPEN_ROUTES = {"/health", "/ready", "/metrics"}
RM_KEYS = {"score": "score-key-for-tests", "admin": "admin-key-for-tests"}
POLICY_KEYS = {"generate": "gen-key-for-tests", "admin": "admin-key-for-tests"}
JSON = {"content-type": "application/json"}
BINARY = {"content-type": "application/octet-stream"}

# Per route, a request that passes with the right key (True: 2xx expected; False: a 4xx about the
# body, which shows the key was accepted). A route the schema lists but this table lacks fails
# `test_every_route_is_in_the_matrix`.
ITEM = {"id": "a", "prompt": "Q: 1+1 A: ", "response": "1+1=2 #### 2"}
RM_REQUESTS = {
    ("POST", "/v1/score"): ({"json": {"reward": "format", "items": [ITEM]}}, True),
    ("POST", "/v1/compare"): (
        {
            "json": {
                "reward": "format",
                "items": [{"id": "a", "prompt": "Q: 1+1 A: ", "response_a": "#### 2", "response_b": "2"}],
            }
        },
        True,
    ),
    ("GET", "/v1/rewards"): ({}, True),
    ("GET", "/v1/admin/queues"): ({}, True),
    # the peers' protocols (rm_server/compat.py): the path's `{reward}` names no reward (404), and
    # `format` is no model reward, which the vLLM pooling shapes need (400)
    ("POST", "/compat/openrlhf/{reward}"): ({"json": {"query": [], "prompts": [], "labels": []}}, False),
    ("POST", "/compat/slime/{reward}"): ({"json": {"prompt": "Q: 1+1 A: ", "response": "#### 2"}}, False),
    ("POST", "/classify"): ({"json": {"model": "format", "input": "Q: 1+1 A: #### 2"}}, False),
    ("POST", "/pooling"): ({"json": {"model": "format", "input": "Q: 1+1 A: #### 2"}}, False),
    ("POST", "/v1/embeddings"): ({"json": {"model": "format", "input": "Q: 1+1 A: #### 2"}}, False),
    ("POST", "/compat/vllm/score"): ({"json": {"model": "format", "text_1": "Q: 1+1 A: ", "text_2": "#### 2"}}, True),
}
POLICY_REQUESTS = {
    ("POST", "/v1/completions"): ({"json": {"model": "policy", "prompt": "1+1=", "max_tokens": 1}}, True),
    ("POST", "/v1/chat/completions"): (
        {"json": {"model": "policy", "max_tokens": 1, "messages": [{"role": "user", "content": "1+1"}]}},
        True,
    ),
    ("POST", "/v1/search"): ({"json": {"prompt": "Q: 1+1 A: ", "strategy": "majority", "n": 1, "max_tokens": 2}}, True),
    ("GET", "/v1/models"): ({}, True),
    ("GET", "/v1/admin/queues"): ({}, True),
    ("POST", "/v1/admin/weights"): (
        {"params": {"model": "policy"}, "content": b"not safetensors", "headers": BINARY},
        False,
    ),
    ("POST", "/v1/admin/weights/load"): ({"json": {"model": "nope", "path": "nowhere.safetensors"}}, False),
    ("POST", "/v1/admin/adapter"): (
        {"params": {"model": "policy"}, "content": b"not safetensors", "headers": BINARY},
        False,
    ),
}


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    """The reward service with keys, HTTP and gRPC, serving one rule (nothing to load)."""
    spec = tmp_path_factory.mktemp("matrix") / "rewards.yaml"
    spec.write_text('rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n')
    keys = (f"{RM_KEYS['score']}:score", f"{RM_KEYS['admin']}:admin")
    with RewardBackground(RewardConfig(spec=spec, port=0, grpc_port=0, api_keys=keys)) as s:
        yield s


@pytest.fixture(scope="module")
def policy():
    """The policy server with keys, HTTP and gRPC, serving the embedded policy."""
    keys = (f"{POLICY_KEYS['generate']}:generate", f"{POLICY_KEYS['admin']}:admin")
    config = PolicyConfig(models={"policy": EMBEDDED["policy"][1]}, port=0, grpc_port=0, api_keys=keys)
    with PolicyBackground(config) as s:
        yield s


@pytest.fixture(scope="module")
def keyless():
    """The policy server as `assay policy serve` starts by default: loopback, no keys."""
    with PolicyBackground(PolicyConfig(models={"policy": EMBEDDED["policy"][1]}, port=0)) as s:
        yield s


SERVICES = {
    "rm": (RM_REQUESTS, RM_KEYS, "score"),
    "policy": (POLICY_REQUESTS, POLICY_KEYS, "generate"),
}


def routes(url: str) -> set[tuple[str, str]]:
    paths = httpx.get(f"{url}/openapi.json").json()["paths"]
    return {(method.upper(), path) for path, methods in paths.items() for method in methods}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def send(url: str, method: str, path: str, request: dict, headers: dict[str, str] | None = None) -> httpx.Response:
    merged = {**request.get("headers", {}), **(headers or {})}
    rest = {k: v for k, v in request.items() if k != "headers"}
    return httpx.request(method, url + path, headers=merged, timeout=60, **rest)


AUTH_TYPES = {401: {"unauthenticated", "authentication_error"}, 403: {"permission_denied", "permission_error"}}


def is_auth_refusal(r: httpx.Response) -> bool:
    message = r.json()["error"]["message"] if r.status_code in (401, 403) else ""
    return r.status_code == 401 or (r.status_code == 403 and "API key" in message)


@pytest.fixture(params=sorted(SERVICES))
def service(request, rm, policy):
    requests, keys, base = SERVICES[request.param]
    return (rm if request.param == "rm" else policy).http_url, requests, keys, base


# --- the HTTP matrix -------------------------------------------------------------------------


def test_every_route_is_in_the_matrix(service):
    url, requests, _, _ = service
    guarded = {r for r in routes(url) if r[1] not in OPEN_ROUTES}
    assert guarded == set(requests), "add the new route to the matrix"


def test_no_key_and_wrong_keys_get_401_before_the_body_is_read(service):
    url, requests, _, _ = service
    for (method, path), (request, _) in requests.items():
        for headers in ({}, bearer("not-a-key-of-this-server"), {"authorization": "wrong-scheme"}):
            r = send(url, method, path, request, headers)
            assert r.status_code == 401 and "key" in r.json()["error"]["message"], (method, path, r.text)
            assert r.json()["error"]["type"] in AUTH_TYPES[401]
        if method == "POST":  # neither a broken body nor a wrong content type is looked at first
            for body, headers in ((b'{"reward": ', JSON), (b"x=1", {"content-type": "text/plain"})):
                r = httpx.post(url + path, content=body, headers=headers, timeout=60)
                assert r.status_code == 401, (path, body, r.text)


def test_under_scoped_keys_get_403_on_admin_routes(service):
    url, requests, keys, base = service
    for (method, path), (request, _) in requests.items():
        r = send(url, method, path, request, bearer(keys[base]))
        if path.startswith("/v1/admin/"):
            assert r.status_code == 403 and "admin" in r.json()["error"]["message"], (path, r.text)
            assert r.json()["error"]["type"] in AUTH_TYPES[403]
        else:
            assert not is_auth_refusal(r), (path, r.text)


def test_the_right_key_gets_through(service):
    url, requests, keys, base = service
    for (method, path), (request, ok) in requests.items():
        key = keys["admin"] if path.startswith("/v1/admin/") else keys[base]
        r = send(url, method, path, request, bearer(key))
        assert not is_auth_refusal(r), (path, r.text)
        assert (r.status_code < 300) == ok, (path, r.status_code, r.text)
    for admin_route in ("/v1/admin/queues",):  # admin implies the lower scope too
        assert httpx.get(url + admin_route, headers=bearer(keys["admin"])).status_code == 200


def test_health_readiness_and_metrics_need_no_key(service):
    url = service[0]
    for path in OPEN_ROUTES:
        assert httpx.get(url + path, timeout=30).status_code == 200, path


def test_the_openai_client_authenticates_with_the_key(policy):
    good = openai.OpenAI(base_url=f"{policy.http_url}/v1", api_key=POLICY_KEYS["generate"], max_retries=0)
    assert good.completions.create(model="policy", prompt="1+1=", max_tokens=1, temperature=0).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{policy.http_url}/v1", api_key="not-a-key-of-this-server", max_retries=0).models.list()


def test_a_wrong_method_gets_405_naming_the_allowed_ones(service):
    url, requests, _, _ = service
    for method, path in {*requests, ("GET", "/health")}:
        wrong = "DELETE"
        r = httpx.request(wrong, url + path, timeout=30)
        assert r.status_code == 405 and "error" in r.json(), (path, r.text)
        assert method in {m.strip() for m in r.headers["allow"].split(",")}, (path, r.headers)


# --- the gRPC matrix -------------------------------------------------------------------------


GRPC = {
    "rm": (reward_pb2, "RewardService", RM_KEYS, "score"),
    "policy": (policy_pb2, "PolicyService", POLICY_KEYS, "generate"),
}


def grpc_calls(channel: grpc.Channel, module, service_name: str):
    """(name, call) for every method of the service, each sending an empty request."""
    service = module.DESCRIPTOR.services_by_name[service_name]
    for method in service.methods:
        request_type = getattr(module, method.input_type.name)
        response_type = getattr(module, method.output_type.name)
        path = f"/{service.full_name}/{method.name}"
        kwargs = {
            "request_serializer": request_type.SerializeToString,
            "response_deserializer": response_type.FromString,
        }
        if method.client_streaming:
            stub = channel.stream_stream(path, **kwargs)
            yield method.name, lambda md, stub=stub, t=request_type: list(stub(iter([t()]), metadata=md, timeout=30))
        else:
            stub = channel.unary_unary(path, **kwargs)
            yield method.name, lambda md, stub=stub, t=request_type: stub(t(), metadata=md, timeout=30)


def grpc_status(call, metadata) -> grpc.StatusCode:
    try:
        call(metadata)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("name", sorted(GRPC))
def test_grpc_methods_need_a_valid_key_and_health_stays_open(name, rm, policy):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    module, service_name, keys, base = GRPC[name]
    server = rm if name == "rm" else policy
    with grpc.insecure_channel(server.grpc_target) as channel:
        calls = list(grpc_calls(channel, module, service_name))
        assert calls
        for method, call in calls:
            for metadata in (
                None,
                (("authorization", "Bearer not-a-key-of-this-server"),),
                (("authorization", keys[base]),),
            ):
                assert grpc_status(call, metadata) == grpc.StatusCode.UNAUTHENTICATED, (method, metadata)
            for key in (keys[base], keys["admin"]):
                status = grpc_status(call, (("authorization", f"Bearer {key}"),))
                assert status not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), method
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


# --- keys ------------------------------------------------------------------------------------


def test_short_keys_are_refused_naming_the_rule(monkeypatch):
    monkeypatch.delenv("ASSAY_API_KEYS", raising=False)
    monkeypatch.delenv("ASSAY_POLICY_API_KEYS", raising=False)
    for short in ("k", "x" * (MIN_KEY_LENGTH - 1)):
        with pytest.raises(ValueError, match=f"at least {MIN_KEY_LENGTH} characters"):
            ApiKeys([f"{short}:score"])
        with pytest.raises(ValueError, match=f"at least {MIN_KEY_LENGTH} characters"):
            RewardServer(RewardConfig(host="0.0.0.0", port=0, grpc_port=None, api_keys=(f"{short}:score",)))
        with pytest.raises(ValueError, match=f"at least {MIN_KEY_LENGTH} characters"):
            PolicyServer(PolicyConfig(host="0.0.0.0", port=0, api_keys=(f"{short}:generate",)))
    assert ApiKeys(["x" * MIN_KEY_LENGTH + ":score"])


# --- cross-site requests (defect 2) ----------------------------------------------------------


EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def lm_head():
    model, _ = load_embedded("policy")
    return save({"lm_head.weight": model.state_dict()["lm_head.weight"].clone() * 0})


def weight_version(url: str) -> int:
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["weight_version"]


def upload(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/weights", params={"model": "policy"}, content=body, headers=headers, timeout=60)


def test_a_web_page_cannot_replace_the_weights_of_a_keyless_server(keyless, lm_head):
    url = keyless.http_url
    before = weight_version(url)
    # what any page can send without a preflight: a text/plain body, its own Origin
    refused = upload(url, lm_head, {"content-type": "text/plain", "origin": EVIL})
    assert refused.status_code == 403 and "origin" in refused.json()["error"]["message"], refused.text
    # a browser's fetch of an ArrayBuffer sends no content type at all; a form, its own
    for headers in ({"content-type": "text/plain"}, {}, {"content-type": "multipart/form-data; boundary=x"}):
        r = upload(url, lm_head, headers)
        assert r.status_code == 415 and "application/octet-stream" in r.json()["error"]["message"], (headers, r.text)
    other_port = url.rsplit(":", 1)[0] + ":1"
    for extra in (
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
        {"origin": "null"},
        {"origin": url.replace("127.0.0.1", "localhost")},
        {"origin": other_port},
    ):
        headers = {**BINARY, **extra}
        r = upload(url, lm_head, headers)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", (headers, r.text)
    assert weight_version(url) == before


def test_cross_site_generation_is_refused_too(keyless):
    url = keyless.http_url
    body = {"model": "policy", "prompt": "1+1=", "max_tokens": 1}
    for headers in ({"origin": EVIL}, {"sec-fetch-site": "cross-site"}):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 403, (headers, r.text)
    r = httpx.post(
        f"{url}/v1/completions",
        content=b'{"model": "policy", "prompt": "1"}',
        headers={"content-type": "text/plain"},
        timeout=60,
    )
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"


def test_a_rebinding_host_is_refused_on_every_route(keyless):
    url = keyless.http_url
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/completions")):
        r = httpx.request(method, url + path, headers={"host": "evil.example:80"}, json={}, timeout=30)
        assert r.status_code == 403 and "evil.example" in r.json()["error"]["message"], (path, r.text)


def test_same_origin_and_programs_still_work(keyless, lm_head):
    url = keyless.http_url
    port = url.rsplit(":", 1)[1]
    body = {"model": "policy", "prompt": "1+1=", "max_tokens": 1}
    ipv6 = {"host": f"[::1]:{port}", "origin": f"http://[::1]:{port}"}
    for headers in (
        {},
        {"origin": url, "sec-fetch-site": "same-origin"},
        {"host": f"localhost:{port}"},
        ipv6,
        {"sec-fetch-site": "none"},
    ):
        r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, (headers, r.text)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert client.models.list().data[0].id == "policy"
    original = save({"lm_head.weight": load_embedded("policy")[0].state_dict()["lm_head.weight"]})
    before = weight_version(url)
    r = upload(url, original, {**BINARY, "origin": url})  # the same weights: a same-origin upload goes through
    assert r.status_code == 200 and weight_version(url) == before + 1, r.text


def test_the_reward_service_refuses_cross_site_requests_too(rm):
    url = rm.http_url
    body = {"reward": "format", "items": [ITEM]}
    for headers in ({"origin": EVIL}, {"sec-fetch-site": "cross-site"}, {"host": "evil.example"}):
        r = httpx.post(f"{url}/v1/score", json=body, headers={**bearer(RM_KEYS["score"]), **headers}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["type"] == "permission_denied", (headers, r.text)
    r = httpx.post(f"{url}/v1/score", content=b"{}", headers={**bearer(RM_KEYS["score"]), "content-type": "text/plain"})
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request"


def test_allowed_hosts_follow_the_bound_address():
    assert allowed_hosts("127.0.0.1") == ("127.0.0.1", "localhost", "::1")
    assert allowed_hosts("::1", ["Api.Example.com."]) == ("127.0.0.1", "localhost", "::1", "api.example.com")
    assert allowed_hosts("0.0.0.0") is None  # keys are required there; any Host is fine
    assert allowed_hosts("0.0.0.0", ["api.example.com"]) == ("api.example.com",)
    assert allowed_hosts("127.0.0.1", ["*"]) is None


def test_a_configured_host_name_is_answered_and_others_are_not(tmp_path):
    spec = tmp_path / "rewards.yaml"
    spec.write_text('rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n')
    config = RewardConfig(spec=spec, port=0, grpc_port=None, allowed_hosts=("*.example.com",))
    with RewardBackground(config) as s:
        for host, status in (("rm.example.com", 200), ("127.0.0.1", 200), ("example.org", 403)):
            assert httpx.get(f"{s.http_url}/v1/rewards", headers={"host": host}).status_code == status, host
