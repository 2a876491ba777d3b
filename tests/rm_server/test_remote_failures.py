"""The remote rewards against a server that misbehaves: retries, deadlines, typed failures, batching.

`remote_double` below is a test double: a small loopback server that stands in for vLLM's
`/classify` (vLLM cannot run in CI) and for an OpenRLHF reward server, answering each in its
protocol's shape with a made-up score (the text's length / 100), unless a test scripts what it
answers next (a status, a body, a Retry-After, a delay). That scores equal a real model's is
checked against rm_server's own pooling and OpenRLHF routes (test_remote_rm_server.py); this
file checks what no healthy server shows.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from assay.base.errors import Overloaded
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorType, Granularity, RewardsResponse, ScoreResponse
from assay.rm_server.rewards.base import DEADLINE, Item, ItemFailure, Scored
from assay.rm_server.rewards.endpoint import KeyRefused
from assay.rm_server.rewards.remote import OpenRLHFReward, RemoteReward, VllmClassifyReward
from assay.rm_server.server import BackgroundServer
from assay.rm_server.spec import OpenRLHFSpec, VllmClassifySpec, parse_spec, reward_ids
from assay.services import free_port
from tests.rm_server.judge_double import serve

pytestmark = pytest.mark.service

KEY = "remote-key-for-tests"


def made_up(text: str) -> float:
    return len(text) / 100


def remote_app() -> FastAPI:
    """The double (see the module docstring). `app.state.script`: answers to give first, each
    `(status, body, headers, delay_s)`; `app.state.key`: the bearer key it requires, if any."""
    app = FastAPI()
    app.state.requests, app.state.script, app.state.key = [], [], None

    async def scripted(request: Request) -> tuple[dict, JSONResponse | None]:
        body = await request.json()
        app.state.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        if app.state.key and request.headers.get("authorization") != f"Bearer {app.state.key}":
            return body, JSONResponse({"error": {"message": "bad key"}}, 401)
        if app.state.script:
            status, answer, headers, delay_s = app.state.script.pop(0)
            await asyncio.sleep(delay_s)
            return body, JSONResponse(answer, status, headers=headers)
        return body, None

    @app.post("/classify")
    async def classify(request: Request):
        body, early = await scripted(request)
        if early is not None:
            return early
        texts = body["input"] if "input" in body else ["".join(m["content"] for m in body["messages"])]
        data = [{"index": i, "label": "x", "probs": [made_up(t)], "num_classes": 1} for i, t in enumerate(texts)]
        return {"object": "list", "model": body["model"], "data": data, "usage": {"prompt_tokens": 1}}

    @app.post("/get_reward")
    async def get_reward(request: Request):
        body, early = await scripted(request)
        if early is not None:
            return early
        rewards = [made_up(q) for q in body["query"]]
        return {"rewards": rewards, "scores": [-r for r in rewards], "extra_logs": {}}

    return app


@pytest.fixture(scope="module")
def remote():
    app = remote_app()
    with serve(app) as url:
        yield app, url


@pytest.fixture
def double(remote):
    app, url = remote
    app.state.script.clear()
    app.state.key = None
    return app, url


def classify_spec(url: str, **kw) -> VllmClassifySpec:
    return VllmClassifySpec(type="remote.vllm_classify", url=url, model=kw.pop("model", "orm"), **kw)


def openrlhf_spec(url: str, **kw) -> OpenRLHFSpec:
    return OpenRLHFSpec(type="remote.openrlhf", url=f"{url}/get_reward", **kw)


def build(spec) -> RemoteReward:
    cls = VllmClassifyReward if isinstance(spec, VllmClassifySpec) else OpenRLHFReward
    return cls("rm", "sha256:test", spec)


def with_reward(spec, call, deadline_s: float | None = None):
    """Start the reward, await `call(reward)` (under a request deadline of `deadline_s`), close it."""

    async def go():
        reward = build(spec)
        await reward.start()
        token = DEADLINE.set(asyncio.get_running_loop().time() + deadline_s) if deadline_s else None
        try:
            return await call(reward)
        finally:
            if token is not None:
                DEADLINE.reset(token)
            await reward.close()

    return asyncio.run(go())


def score(spec, items: list[Item], deadline_s: float | None = None):
    return with_reward(spec, lambda r: r.score(items, Granularity.outcome), deadline_s)


def posts(app, since: int) -> list[dict]:
    """The scoring requests the double got after `since` (the start-up check excluded: it sends one input)."""
    return [r for r in app.state.requests[since:] if r["body"].get("input") != ["check"] and r["body"].get("query")]


def items(n: int) -> list[Item]:
    return [Item(f"Q: {k}+1 A: ", "x" * k, reference=str(k)) for k in range(1, n + 1)]


# --- shapes of a healthy answer -----------------------------------------------------------------


def test_one_classify_request_per_batch_and_scores_in_item_order(double):
    app, url = double
    n = len(app.state.requests)
    out = score(classify_spec(url, use_activation=False), items(5))
    assert [o.value for o in out] == [made_up(f"Q: {k}+1 A: " + "x" * k) for k in range(1, 6)]
    check, batch = app.state.requests[n:]
    assert check["body"]["input"] == ["check"]  # the start-up check
    assert batch["path"] == "/classify" and batch["body"]["model"] == "orm"
    assert batch["body"]["use_activation"] is False and len(batch["body"]["input"]) == 5


def test_concurrent_requests_share_batches_up_to_max_batch_items(double):
    app, url = double
    spec = classify_spec(url, max_batch_items=4, max_wait_ms=200, max_concurrency=1)
    n = len(app.state.requests)

    async def three_requests(reward):
        return await asyncio.gather(*(reward.score(items(3), Granularity.outcome) for _ in range(3)))

    results = with_reward(spec, three_requests)
    assert all(isinstance(o, Scored) for out in results for o in out)
    sizes = [len(r["body"]["input"]) for r in app.state.requests[n + 1 :]]
    assert sum(sizes) == 9 and max(sizes) <= 4 and len(sizes) < 9  # items of three requests shared requests


def test_openrlhf_sends_query_prompts_labels_and_reads_the_chosen_key(double):
    app, url = double
    n = len(app.state.requests)
    its = items(2)
    assert [o.value for o in score(openrlhf_spec(url), its)] == [made_up(i.prompt + i.response) for i in its]
    check, batch = app.state.requests[n:]
    assert check["body"] == {"query": [], "prompts": [], "labels": []}  # an empty batch checks the key
    assert batch["body"] == {
        "query": [i.prompt + i.response for i in its],
        "prompts": [i.prompt for i in its],
        "labels": ["1", "2"],
    }
    scores = score(openrlhf_spec(url, key="scores"), its)
    assert [o.value for o in scores] == [-made_up(i.prompt + i.response) for i in its]


def test_a_conversation_is_sent_as_messages_only_with_chat_template(double):
    app, url = double
    chat = Item([{"role": "system", "content": "Be exact."}, {"role": "user", "content": "1+1?"}], "2")
    for spec in (classify_spec(url), openrlhf_spec(url)):
        [o] = score(spec, [chat])
        assert isinstance(o, ItemFailure) and o.type == ErrorType.invalid_input and "messages" in o.message
    n = len(app.state.requests)
    [o] = score(classify_spec(url, chat_template=True), [chat])
    assert isinstance(o, Scored) and o.value == made_up("Be exact.1+1?2")
    sent = app.state.requests[-1]["body"]
    assert app.state.requests[n + 1 :] == [app.state.requests[-1]] and "input" not in sent
    assert sent["messages"] == [*chat.prompt, {"role": "assistant", "content": "2"}]


# --- answers of the wrong shape: a typed failure naming what was wrong, never a score -----------


@pytest.mark.parametrize(
    ("answer", "named"),
    [
        ({"data": [{"index": 0, "probs": [0.5]}]}, "1 results for 2 inputs"),
        ({"data": [{"index": 0, "probs": [0.5]}, {"index": 0, "probs": [0.5]}]}, "data[1].index is 0"),
        ({"data": [{"index": 0, "probs": [0.5]}, {"index": 1, "probs": []}]}, "data[1] has 0 classes"),
        ({"data": [{"index": 0, "probs": [0.5]}, {"index": 1, "probs": ["NaN"]}]}, "data[1].probs[0] is 'NaN'"),
        ({"result": "ok"}, "no `data` list"),
    ],
)
def test_a_classify_answer_of_the_wrong_shape_fails_every_item_of_its_batch(double, answer, named):
    app, url = double
    app.state.script.append((200, answer, None, 0))
    app.state.script.insert(0, (200, {"data": []}, None, 0))  # the start-up check's answer: not read
    out = score(classify_spec(url, max_wait_ms=100), items(2))
    for o in out:
        assert isinstance(o, ItemFailure) and o.type == ErrorType.remote_error, o
        assert named in o.message and url in o.message


def test_an_openrlhf_answer_of_the_wrong_length_is_a_remote_error(double):
    app, url = double
    app.state.script += [(200, {}, None, 0), (200, {"rewards": [1.0]}, None, 0)]
    out = score(openrlhf_spec(url, max_wait_ms=100), items(2))
    assert all(isinstance(o, ItemFailure) and "1 rewards for 2 queries" in o.message for o in out)
    app.state.script += [(200, {}, None, 0), (200, {"scores": [1.0]}, None, 0)]
    [o] = score(openrlhf_spec(url), items(1))
    assert isinstance(o, ItemFailure) and "no `rewards` list" in o.message


# --- retries, deadlines ---------------------------------------------------------------------------


def test_503_with_retry_after_is_retried_after_it_and_a_400_never(double):
    app, url = double
    app.state.script += [(200, {}, None, 0), (503, {"error": "loading"}, {"Retry-After": "0.3"}, 0)]
    n = len(app.state.requests)
    started = time.monotonic()
    [o] = score(classify_spec(url), items(1))
    assert isinstance(o, Scored) and time.monotonic() - started >= 0.3  # not sooner than the server said
    assert len(app.state.requests[n:]) == 3  # the check, the 503, the retry
    app.state.script += [(200, {}, None, 0), (400, {"error": "bad input"}, None, 0)]
    n = len(app.state.requests)
    [o] = score(classify_spec(url), items(1))
    assert isinstance(o, ItemFailure) and o.type == ErrorType.remote_error and "400" in o.message
    assert len(app.state.requests[n:]) == 2  # never retried


def test_a_server_that_keeps_failing_is_remote_unavailable_after_its_retries(double):
    app, url = double
    app.state.script += [(200, {}, None, 0)] + [(502, {"error": "bad gateway"}, None, 0)] * 3
    n = len(app.state.requests)
    [o] = score(openrlhf_spec(url, retries=2), items(1))
    assert isinstance(o, ItemFailure) and o.type == ErrorType.remote_unavailable and "502" in o.message
    assert len(app.state.requests[n:]) == 4  # the check, then 1 + 2 retries


def test_a_retry_after_beyond_the_deadline_fails_at_once(double):
    app, url = double
    app.state.script += [(200, {}, None, 0), (429, {"error": "busy"}, {"Retry-After": "30"}, 0)]
    started = time.monotonic()
    [o] = score(classify_spec(url), items(1), deadline_s=5)
    assert isinstance(o, ItemFailure) and o.type == ErrorType.remote_unavailable and "429" in o.message
    assert time.monotonic() - started < 5  # it did not wait for the deadline it could not make


def test_the_request_deadline_bounds_a_slow_server(double):
    app, url = double
    app.state.script += [(200, {}, None, 0), (200, {"data": []}, None, 5.0)]
    [o] = score(classify_spec(url, timeout_s=30), items(1), deadline_s=1.0)
    assert isinstance(o, ItemFailure) and o.type == ErrorType.timeout


def test_a_server_that_is_down_fails_typed_and_the_reward_still_starts():
    url = f"http://127.0.0.1:{free_port()}"
    for spec in (classify_spec(url, retries=1), openrlhf_spec(url, retries=1)):
        [o] = score(spec, items(1))
        assert isinstance(o, ItemFailure) and o.type == ErrorType.remote_unavailable and url in o.message


def test_a_full_queue_is_refused_whole(double):
    app, url = double
    app.state.script += [(200, {}, None, 0), (200, {"data": []}, None, 1.0)]  # the first batch holds the line

    async def overflow(reward):
        first = asyncio.ensure_future(reward.score(items(3), Granularity.outcome))  # 1 in flight, 2 queued
        await asyncio.sleep(0.3)
        with pytest.raises(Overloaded) as refused:
            await reward.score(items(2), Granularity.outcome)
        await first
        return refused.value

    refused = with_reward(classify_spec(url, max_queue=3, max_concurrency=1, max_batch_items=1), overflow)
    assert refused.retry_after_s > 0 and "queue is full" in refused.message


# --- the key ---------------------------------------------------------------------------------------


def test_the_key_is_sent_and_a_refused_one_stops_the_start(double, monkeypatch):
    app, url = double
    app.state.key = KEY
    monkeypatch.setenv("ASSAY_TEST_REMOTE_KEY", KEY)
    [o] = score(classify_spec(url, api_key_env="ASSAY_TEST_REMOTE_KEY"), items(1))
    assert isinstance(o, Scored) and app.state.requests[-1]["headers"]["authorization"] == f"Bearer {KEY}"
    monkeypatch.setenv("ASSAY_TEST_REMOTE_KEY", "wrong-key")
    with pytest.raises(KeyRefused, match=r"reward 'rm': .*/get_reward refused its key \(401.*ASSAY_TEST_REMOTE_KEY"):
        score(openrlhf_spec(url, api_key_env="ASSAY_TEST_REMOTE_KEY"), items(1))
    with pytest.raises(KeyRefused, match="api_key_env"):
        score(classify_spec(url), items(1))


# --- ids, and through the service ------------------------------------------------------------------


@pytest.mark.unit
def test_the_id_covers_the_remotes_identity_and_not_how_it_is_called():
    base = {"type": "remote.vllm_classify", "url": "http://a:8000", "model": "rm"}
    variants = {
        "base": base,
        "slash": {**base, "url": "http://a:8000/"},
        "runtime": {**base, "timeout_s": 5, "retries": 0, "max_batch_items": 2, "max_concurrency": 9},
        "url": {**base, "url": "http://b:8000"},
        "model": {**base, "model": "rm2"},
        "template": {**base, "template": "Q: {prompt}\nA: {response}"},
        "activation": {**base, "use_activation": False},
        "index": {**base, "index": 1},
        "openrlhf": {"type": "remote.openrlhf", "url": "http://a:8000"},
    }
    ids = reward_ids(parse_spec({"rewards": variants}))
    assert ids["base"] == ids["slash"] == ids["runtime"]
    assert len({ids[k] for k in variants} - {ids["base"]}) == len(variants) - 3


def test_through_the_service_a_remote_reward_is_unpinned_and_composes(double, tmp_path):
    app, url = double
    spec = tmp_path / "rewards.yaml"
    spec.write_text(
        "rewards:\n"
        f"  rm: {{type: remote.vllm_classify, url: '{url}', model: orm}}\n"
        "  form: {type: rule.regex, pattern: 'x'}\n"
        "  mix: {type: composite, expr: '0.5*rm + 0.5*form'}\n"
    )
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        listing = RewardsResponse.model_validate_json(httpx.get(f"{s.http_url}/v1/rewards").content)
        pinned = {r.name: (r.type, r.pinned) for r in listing.rewards}
        assert pinned == {
            "rm": ("remote.vllm_classify", False),
            "form": ("rule.regex", True),
            "mix": ("composite", False),
        }
        body = {"reward": "mix", "items": [{"id": "a", "prompt": "Q: ", "response": "xx"}]}
        resp = ScoreResponse.model_validate_json(httpx.post(f"{s.http_url}/v1/score", json=body, timeout=30).content)
        assert resp.results[0].score == pytest.approx(0.5 * made_up("Q: xx") + 0.5)
        app.state.script += [(503, {"error": "down"}, None, 0)] * 3
        body["reward"] = "mix"
        resp = ScoreResponse.model_validate_json(httpx.post(f"{s.http_url}/v1/score", json=body, timeout=30).content)
        [r] = resp.results
        assert r.score is None and r.error is not None and r.error.type == ErrorType.remote_unavailable
        metrics = httpx.get(f"{s.http_url}/metrics").text  # each attempt at the server, by outcome
        assert 'assay_rm_remote_request_seconds_count{outcome="ok",reward="rm"} 1.0' in metrics
        assert 'assay_rm_remote_request_seconds_count{outcome="remote_unavailable",reward="rm"} 3.0' in metrics
