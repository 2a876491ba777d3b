"""The reward service over real HTTP on loopback: every reward type, errors, limits, metrics."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from assay.rm_server.config import Limits, ServerConfig
from assay.rm_server.protocol import CompareResponse, ErrorResponse, ErrorType, RewardsResponse, ScoreResponse
from assay.rm_server.server import BackgroundServer
from tests.helpers import wait_for

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"  # last step wrong
BROKEN = "23+45=68 68-1"  # no final answer


def score(url: str, reward: str, items: list[dict], **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/score", json={"reward": reward, "items": items, **extra}, timeout=60)


def scores(url: str, reward: str, responses: list[str], reference: str | None = "51", **extra) -> ScoreResponse:
    items = [{"id": f"i{k}", "prompt": PROMPT, "response": r, "reference": reference} for k, r in enumerate(responses)]
    r = score(url, reward, items, **extra)
    assert r.status_code == 200, r.text
    return ScoreResponse.model_validate_json(r.content)


def error_of(r: httpx.Response, status: int) -> ErrorResponse:
    assert r.status_code == status, r.text
    return ErrorResponse.model_validate_json(r.content)


# --- every reward type -----------------------------------------------------------------------


def test_rules_score_right_and_wrong_answers(server):
    url = server.http_url
    assert [x.score for x in scores(url, "correct", [RIGHT, WRONG]).results] == [1.0, 0.0]
    assert [x.score for x in scores(url, "exact", [RIGHT, WRONG]).results] == [1.0, 0.0]
    assert [x.score for x in scores(url, "format", [RIGHT, BROKEN]).results] == [1.0, 0.0]
    assert [x.score for x in scores(url, "json", ['{"answer": 51}', RIGHT]).results] == [1.0, 0.0]
    # 25 chars is inside max_length - buffer = 20..30: penalty (25 - 20) / 10
    assert scores(url, "short", [RIGHT]).results[0].score == pytest.approx(-0.5)
    steps = scores(url, "steps", [WRONG], granularity="steps").results[0]
    assert (steps.score, steps.steps) == (0.0, [1.0, 0.0, 0.0])


def test_model_rewards_match_in_process_scoring(server):
    from assay.arith.checks import segments
    from assay.checkpoints import load_embedded
    from assay.scoring import score_outcome, score_steps

    url = server.http_url
    orm = scores(url, "orm", [RIGHT, WRONG])
    model, tok = load_embedded("orm")
    expected = [1 / (1 + math.exp(-x)) for x in score_outcome(model, tok, [PROMPT + RIGHT, PROMPT + WRONG])]
    assert [x.score for x in orm.results] == pytest.approx(expected, abs=1e-6)

    prm = scores(url, "prm", [RIGHT, WRONG], granularity="steps")
    model, tok = load_embedded("prm")
    ends = [[s.end for s in segments(r)] for r in (RIGHT, WRONG)]
    expected = score_steps(model, tok, [(PROMPT, RIGHT, ends[0]), (PROMPT, WRONG, ends[1])])
    for got, want in zip(prm.results, expected, strict=True):
        assert got.steps == pytest.approx(want, abs=1e-6)
        assert got.score == pytest.approx(min(want), abs=1e-6)


def test_token_scores_cover_the_response_and_end_at_the_outcome(server):
    url = server.http_url
    res = scores(url, "orm", [RIGHT], granularity="tokens").results[0]
    assert "".join(t.text for t in res.tokens) == RIGHT  # char-level tokenizer: one token per char
    assert res.tokens[-1].score == pytest.approx(scores(url, "orm", [RIGHT]).results[0].score, abs=1e-6)
    prm = scores(url, "prm", [RIGHT], granularity="tokens").results[0]
    assert len(prm.tokens) == len(RIGHT) and prm.steps is not None


def test_judge_scores_with_the_verifier_and_ranks_right_above_wrong(server):
    res = scores(server.http_url, "judge", [RIGHT, BROKEN]).results
    assert all(0.0 < x.score < 1.0 for x in res)
    assert res[0].score > res[1].score


def test_composite_gates_then_combines_its_parts(server):
    url = server.http_url
    final = scores(url, "final", [RIGHT, WRONG, BROKEN]).results
    orm = scores(url, "orm", [RIGHT, WRONG]).results
    assert final[0].score == pytest.approx(0.8 * 1.0 + 0.2 * orm[0].score)
    assert final[1].score == pytest.approx(0.2 * orm[1].score)
    assert final[2].score == 0.0  # gate `format` fails: 0, and not an error


def test_a_judge_that_is_down_fails_each_item_typed_and_never_zero(server):
    res = scores(server.http_url, "down", [RIGHT, WRONG]).results
    assert [(x.score, x.error.type) for x in res] == [(None, ErrorType.judge_unavailable)] * 2
    # a composite over it fails those items too, naming the part
    either = scores(server.http_url, "either", [RIGHT]).results[0]
    assert either.score is None and "down" in either.error.message


def test_compare_prefers_the_right_answer_and_reports_both_scores(server):
    items = [{"id": "p", "prompt": PROMPT, "response_a": RIGHT, "response_b": BROKEN}]
    r = httpx.post(f"{server.http_url}/v1/compare", json={"reward": "prm", "items": items}, timeout=60)
    res = CompareResponse.model_validate_json(r.content).results[0]
    a, b = res.scores
    assert res.prob_a == pytest.approx(1 / (1 + math.exp(-(a - b))))
    assert (res.winner == "a") == (a > b)


def test_rewards_listing_and_ids_echoed(server):
    listing = RewardsResponse.model_validate_json(httpx.get(f"{server.http_url}/v1/rewards").content)
    by_name = {r.name: r for r in listing.rewards}
    assert {"correct", "format", "orm", "prm", "judge", "final"} <= set(by_name)
    assert by_name["correct"].needs_reference and not by_name["orm"].needs_reference
    assert by_name["final"].needs_reference  # through its part `correct`
    # a judge's id names its endpoint, not the weights behind it; a composite is pinned when its parts are
    assert by_name["orm"].pinned and by_name["correct"].pinned and by_name["final"].pinned
    assert not by_name["judge"].pinned and not by_name["either"].pinned
    resp = scores(server.http_url, "orm", [RIGHT, WRONG, RIGHT])
    assert resp.reward_id == by_name["orm"].reward_id and resp.reward_id.startswith("sha256:")
    assert [x.id for x in resp.results] == ["i0", "i1", "i2"]


# --- bad input: a clear 4xx, never a 500 ----------------------------------------------------


def test_bad_requests_get_clear_4xx_errors(server):
    url = server.http_url
    item = {"id": "a", "prompt": PROMPT, "response": RIGHT}
    post = lambda body, **kw: httpx.post(f"{url}/v1/score", content=body, timeout=30, **kw)
    assert (
        "JSON"
        in error_of(
            post(b'{"reward": "orm", "items": [', headers={"content-type": "application/json"}), 400
        ).error.message
    )
    assert "items" in error_of(score(url, "orm", "not a list"), 400).error.message  # type: ignore[arg-type]
    assert "empty" in error_of(score(url, "orm", []), 400).error.message
    assert "unknown reward 'nope'" in error_of(score(url, "nope", [item]), 404).error.message
    assert "needs a `reference`" in error_of(score(url, "correct", [item]), 400).error.message
    assert "twice" in error_of(score(url, "orm", [item, item]), 400).error.message
    assert "max_tokens" in error_of(score(url, "orm", [{**item, "response": "1+1=2 " * 20}]), 400).error.message
    assert "refernce" in error_of(score(url, "orm", [{**item, "refernce": "51"}]), 400).error.message
    assert "granularity" in error_of(score(url, "orm", [item], granularity="words"), 400).error.message
    assert "steps" in error_of(score(url, "orm", [item], granularity="steps"), 400).error.message
    bad_utf8 = b'{"reward": "orm", "items": [{"id": "a", "prompt": "\xff\xfe", "response": "x"}]}'
    assert (
        error_of(post(bad_utf8, headers={"content-type": "application/json"}), 400).error.type
        == ErrorType.invalid_request
    )


def test_limits_on_body_size_and_item_count():
    with BackgroundServer(ServerConfig(port=0, grpc_port=None, limits=Limits(max_body_bytes=4096, max_items=3))) as s:
        item = {"id": "a", "prompt": PROMPT, "response": RIGHT}
        big = [{**item, "id": str(k)} for k in range(60)]
        assert error_of(score(s.http_url, "orm", big), 413).error.type == ErrorType.payload_too_large
        few = [{**item, "id": str(k)} for k in range(4)]
        assert "limit of 3" in error_of(score(s.http_url, "orm", few), 400).error.message
        # chunked upload with no Content-Length is counted as it streams
        chunks = iter([b'{"reward": "orm", "items": [', b" " * 5000, b"]}"])
        r = httpx.post(f"{s.http_url}/v1/score", content=chunks, headers={"content-type": "application/json"})
        assert error_of(r, 413).error.type == ErrorType.payload_too_large


# --- batching, back-pressure, deadlines ------------------------------------------------------


class HeldBackend:
    """Wraps the ORM backend so a test can hold the model worker busy (a gate, not a fake model)."""

    def __init__(self, backend) -> None:
        self.inner, self.gate, self.calls = backend, threading.Event(), []
        self.num_labels = backend.num_labels
        self.free_calls = 0  # this many calls pass before the gate holds

    def pooled(self, batch):
        self.calls.append(len(batch))
        if len(self.calls) > self.free_calls:
            self.gate.wait(30)
        return self.inner.pooled(batch)

    def per_token(self, batch):
        return self.inner.per_token(batch)

    @property
    def ready(self):
        return self.inner.ready

    def close(self):
        self.inner.close()


@pytest.fixture
def held_orm(tmp_path):
    from assay.checkpoints import ARITH_DIR

    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"rewards:\n  orm: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, max_queue: 8, max_wait_ms: 1}}\n"
        f"  one: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, max_batch_items: 1, max_wait_ms: 0}}\n"
    )
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        held = HeldBackend(s.service.rewards["orm"].backend)
        s.service.rewards["orm"].backend = held
        s.service.rewards["one"].backend = HeldBackend(s.service.rewards["one"].backend)
        yield s, held
        held.gate.set()
        s.service.rewards["one"].backend.gate.set()


def test_full_queue_answers_429_with_retry_after(held_orm):
    s, held = held_orm
    item = lambda k: {"id": str(k), "prompt": PROMPT, "response": RIGHT}
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(score, s.http_url, "orm", [item(0)])  # occupies the worker
        wait_for(lambda: held.calls, 10)
        queued = pool.submit(score, s.http_url, "orm", [item(k) for k in range(8)])  # fills the queue
        wait_for(lambda: s.service.rewards["orm"].queue_depth() == 8, 10)
        r = score(s.http_url, "orm", [item(99)])
        assert error_of(r, 429).error.type == ErrorType.overloaded
        assert int(r.headers["retry-after"]) >= 1
        assert "split" in error_of(score(s.http_url, "orm", [item(k) for k in range(9)]), 400).error.message
        held.gate.set()
        assert first.result().status_code == 200 and queued.result().status_code == 200
    # the 8 waiting items were scored together, in one batch
    assert held.calls == [1, 8]


def test_deadline_fails_items_and_cancels_their_queued_work(held_orm):
    s, held = held_orm
    item = lambda k: {"id": str(k), "prompt": PROMPT, "response": RIGHT}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(score, s.http_url, "orm", [item(0)])
        wait_for(lambda: held.calls, 10)
        r = scores(s.http_url, "orm", [RIGHT, WRONG], timeout_s=0.2)
        assert [(x.score, x.error.type) for x in r.results] == [(None, ErrorType.timeout)] * 2
        assert s.service.rewards["orm"].queue_depth() == 0  # abandoned items left the queue
        held.gate.set()
        first.result()
    assert held.calls == [1]  # nothing was computed for the abandoned request


def test_deadline_keeps_the_scores_already_computed(held_orm):
    s, _ = held_orm
    one = s.service.rewards["one"].backend
    one.free_calls = 1  # the first one-item batch runs, the second is held past the deadline
    r = scores(s.http_url, "one", [RIGHT, WRONG], timeout_s=0.5)
    first, second = r.results
    assert first.error is None and first.score is not None
    assert second.score is None and second.error.type == ErrorType.timeout
    one.gate.set()


# --- security, metrics, schema ---------------------------------------------------------------


@pytest.mark.unit
def test_binding_beyond_loopback_without_keys_is_refused():
    from assay.base.connections import InsecureBinding
    from assay.rm_server.server import RewardServer

    with pytest.raises(InsecureBinding, match="API keys"):
        RewardServer(ServerConfig(host="0.0.0.0", port=0, grpc_port=None))


def test_metrics_count_requests_items_batches_and_values(server):
    scores(server.http_url, "orm", [RIGHT, WRONG])
    scores(server.http_url, "down", [RIGHT])
    text = httpx.get(f"{server.http_url}/metrics").text
    reward_id = scores(server.http_url, "orm", [RIGHT]).reward_id
    assert 'assay_rm_requests_total{code="200",reward="orm",route="/v1/score"}' in text
    assert 'assay_rm_items_total{reward="down",status="judge_unavailable"}' in text
    assert f'assay_rm_reward_value_count{{reward_id="{reward_id}"}}' in text
    assert 'assay_rm_batch_items_count{reward="orm"}' in text
    assert 'assay_rm_queue_depth{reward="orm"} 0.0' in text


def test_openapi_schema_publishes_the_protocol(server):
    schema = httpx.get(f"{server.http_url}/openapi.json").json()
    assert {"/v1/score", "/v1/compare", "/v1/rewards", "/health", "/ready"} <= set(schema["paths"])
    assert {"ScoreRequest", "ScoreResponse", "ErrorResponse"} <= set(schema["components"]["schemas"])


def test_chat_template_mode_reads_the_same_tokens_as_the_equivalent_plain_template(tmp_path):
    from assay.checkpoints import ARITH_DIR

    spec = tmp_path / "chat.yaml"
    spec.write_text(
        "rewards:\n"
        f"  chat:  {{type: model.outcome, path: {ARITH_DIR / 'orm'}, chat_template: true}}\n"
        f"  plain: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, template: 'Q: {{prompt}} A: {{response}}</s>'}}\n"
    )
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        items = [{"id": "a", "prompt": "23+45-17", "response": RIGHT}]
        chat = ScoreResponse.model_validate_json(score(s.http_url, "chat", items).content)
        plain = ScoreResponse.model_validate_json(score(s.http_url, "plain", items).content)
        assert chat.results[0].score == plain.results[0].score
        assert chat.reward_id != plain.reward_id  # the spec says how text is built, so the id does too
        tokens = ScoreResponse.model_validate_json(score(s.http_url, "chat", items, granularity="tokens").content)
        assert "".join(t.text for t in tokens.results[0].tokens) == RIGHT  # the response's tokens only
