"""`POST /v1/search` on the policy server, scored by a real rm_server, both on loopback.

The reference for every strategy is the same search run in this process: the same strategy, the
same seed, a `BackendGenerator` whose sequences go straight to the decode loop (no HTTP, no event
loop, no batcher), and the same rewards. Through the server a generate call's sequences are
submitted together and nothing else is running, so they form the same decode batch as the direct
call, and the two searches agree exactly: texts, scores, choices, usage and trace.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import typer
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from assay.arith import world
from assay.chat import render_prompt
from assay.checkpoints import ARITH_DIR, EMBEDDED, load_embedded, load_tokenizer
from assay.clients.policy import PolicyClient
from assay.clients.reward import RewardClient
from assay.policy_server.backends import GenerationOutput, GenerationRequest
from assay.policy_server.backends.hf import HFBackend, _Job, decode
from assay.policy_server.cli import search_cmd
from assay.policy_server.config import ServerConfig
from assay.policy_server.generator import BackendGenerator, sequence_seed
from assay.policy_server.protocol import ChatCompletionResponse, ErrorResponse, SearchResponse
from assay.policy_server.server import BackgroundServer
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.server import BackgroundServer as RewardServer
from assay.search import STRATEGIES, Budget, GenParams, SearchConfig
from assay.search.remote import RemoteScorer
from assay.services import free_port
from tests.policy_server.backend_double import ScriptedBackend

pytestmark = pytest.mark.e2e

SPEC = f"""
rewards:
  orm: {{type: model.outcome, path: {ARITH_DIR / "orm"}, activation: sigmoid}}
  prm: {{type: model.process, path: {ARITH_DIR / "prm"}, steps: arith}}
"""
PROBLEMS = world.eval_problems(2)
REWARD = {
    "best_of_n": "orm",
    "weighted_best_of_n": "orm",
    "majority": None,
    "refine": "prm",
    "beam_search": "prm",
    "dvts": "prm",
}
# small enough to run fast, tight enough that beam search and DVTS run into it
BUDGET = {"max_candidates": 14, "max_tokens": 480}
SEARCH = {"n": 4, "seed": 7, "beam_width": 2, "max_step_tokens": 12}


class DirectGenerator(BackendGenerator):
    """The server's generator with its sequences decoded right here, in one batch per call."""

    def __init__(self, backend: HFBackend) -> None:
        super().__init__(backend, loop=None, max_sequences=1024)  # type: ignore[arg-type]

    def _submit(self, requests: list[GenerationRequest]) -> list[GenerationOutput]:
        jobs = [_Job(r, threading.Event()) for r in requests]
        return decode(self.backend.model, self.backend.tokenizer, jobs, self.backend.weight_version)


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    spec = tmp_path_factory.mktemp("search") / "rewards.yaml"
    spec.write_text(SPEC)
    with RewardServer(RewardConfig(spec=spec, port=0, grpc_port=None)) as server:
        yield server


@pytest.fixture(scope="module")
def rewards(rm):
    with RewardClient.http(rm.http_url) as client:
        yield client


@pytest.fixture(scope="module")
def policy(rm):
    config = ServerConfig(models={"policy": EMBEDDED["policy"][1]}, port=0, rm_url=rm.http_url)
    with BackgroundServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def direct() -> DirectGenerator:
    model, tokenizer = load_embedded("policy")
    return DirectGenerator(HFBackend("policy", model, tokenizer))


def post(server, **body) -> httpx.Response:
    return httpx.post(f"{server.http_url}/v1/search", json=body, timeout=120)


def search(server, **body) -> SearchResponse:
    r = post(server, **body)
    assert r.status_code == 200, r.text
    return SearchResponse.model_validate_json(r.content)


def refusal(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    return ErrorResponse.model_validate_json(r.content).error.message


# --- the generator -------------------------------------------------------------------------


@pytest.mark.unit
def test_generations_keep_stop_strings_and_say_how_they_ended(direct):
    prompt = "Q: 23+45-17 A: "  # greedy: "23+45=68 68-17=51 #### 51"

    def greedy(max_tokens: int, stop: tuple[str, ...]):
        return direct.generate([prompt], 1, GenParams(temperature=0.0, max_tokens=max_tokens, stop=stop))[0][0]

    step, whole, cut = greedy(16, (" ", "####")), greedy(40, ()), greedy(3, (" ",))
    assert (step.text, step.finish_reason) == ("23+45=68 ", "step")
    assert (whole.text, whole.finish_reason) == ("23+45=68 68-17=51 #### 51", "stop")
    raw = direct._submit(direct.requests([prompt], 1, GenParams(temperature=0.0, max_tokens=40)))[0]
    assert raw.token_ids[-1] == direct.backend.tokenizer.eos_token_id and whole.num_tokens == len(raw.token_ids)
    assert cut.finish_reason == "length" and cut.num_tokens == 3
    assert direct.weight_version == "0"


@pytest.mark.unit
def test_every_sequence_of_a_search_gets_its_own_seed(direct):
    params = GenParams(seed=5)
    seeds = [r.seed for r in direct.requests(["a", "a"], 3, params)]
    next_call = [r.seed for r in direct.requests(["a", "a"], 3, GenParams(seed=6))]
    assert len(set(seeds)) == 6 and not set(seeds) & set(next_call)  # not seed + j: no overlap between calls
    assert seeds[4] == sequence_seed(5, 1, 1)


# --- every strategy over HTTP --------------------------------------------------------------


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_strategy_over_http_is_the_in_process_search(strategy, policy, rewards, direct):
    reward = REWARD[strategy]
    for problem in PROBLEMS:
        res = search(
            policy,
            prompt=problem.prompt,
            strategy=strategy,
            reward=reward,
            budget=BUDGET,
            reference=str(problem.answer),
            **SEARCH,
        )
        assert res.strategy == strategy and res.seed == SEARCH["seed"] and res.weight_version == 0
        assert res.candidates and res.usage.generate_calls >= 1
        assert res.usage.candidates <= BUDGET["max_candidates"] and res.usage.generated_tokens <= BUDGET["max_tokens"]
        assert res.reward_id == (rewards.reward_id(reward) if reward else None)
        assert all(c.correct == (c.final_answer == str(problem.answer)) for c in res.candidates)
        if strategy in ("beam_search", "dvts"):  # step by step, they spend the budget to its last candidate
            assert res.usage.candidates == BUDGET["max_candidates"]
        if strategy in ("best_of_n", "majority"):  # one sample per candidate: the usage is their sum
            assert sum(c.num_tokens for c in res.candidates) == res.usage.generated_tokens

        scorer = None if reward is None else RemoteScorer(rewards, reward)
        config = SearchConfig(**SEARCH, budget=Budget(**BUDGET))
        result = STRATEGIES[strategy](problem.prompt, direct, scorer, config, reference=str(problem.answer))
        want = json.loads(json.dumps(result.to_dict()))  # as the wire has it: tuples become lists
        got = res.model_dump(include=set(want))
        assert got.pop("weight_version") == int(want.pop("weight_version"))
        assert got == want


def test_a_search_without_a_budget_gets_the_servers_caps(policy):
    res = search(policy, prompt=PROBLEMS[0].prompt, strategy="majority", n=3, seed=1)
    assert res.reward_id is None and res.reward is None and res.usage.candidates == 3


# --- final answers: `answer` ---------------------------------------------------------------

BOXED = [r"so \boxed{2.50}", r"\boxed{3}", r"it is \boxed{ 2.5 }", r"\boxed{3}, no: \boxed{5/2}", "no box #### 3"]


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend("policy", load_tokenizer(EMBEDDED["policy"][1]), BOXED)


@pytest.fixture(scope="module")
def scripted(backend):
    """The policy server with scripted models (tests/policy_server/backend_double.py): responses the
    tiny policy cannot write. `plain` has no chat template. Majority vote scores nothing, so no
    rm_server is needed."""
    plain = load_tokenizer(EMBEDDED["policy"][1])
    plain.chat_template = None
    models = {"policy": backend, "plain": ScriptedBackend("plain", plain, BOXED)}
    with BackgroundServer(ServerConfig(port=0, rm_url=f"http://127.0.0.1:{free_port()}"), models) as s:
        yield s


@pytest.mark.service
def test_majority_over_http_votes_on_boxed_answers(scripted):
    body = {"prompt": "What is 5/2? ", "strategy": "majority", "n": 5, "round_size": 5, "reference": "2.50"}
    res = search(scripted, **body, answer={"how": "boxed"})
    assert [c.final_answer for c in res.candidates] == ["2.5", "3", "2.5", "5/2", None]  # normalised: one vote
    assert res.answer == "2.5" and res.chosen == 0 and res.text == BOXED[0]
    assert [c.correct for c in res.candidates] == [True, False, True, False, False]  # the reference normalised too
    assert res.trace[0]["votes"] == {"2.5": 2, "3": 1, "5/2": 1}

    hashes = search(scripted, **body)  # the default, `#### n`, as before: only the last response has one
    assert [c.final_answer for c in hashes.candidates] == [None, None, None, None, "3"] and hashes.answer == "3"
    last = search(scripted, **body, answer={"how": "last_number"})
    assert [c.final_answer for c in last.candidates] == ["2.5", "3", "2.5", "2", "3"]
    regex = search(scripted, **body, answer={"how": "regex", "pattern": r"no: \\boxed\{(.*)\}"})
    assert regex.answer == "5/2" and [c.final_answer for c in regex.candidates].count(None) == 4

    app = typer.Typer()
    app.command()(search_cmd)
    args = ["What is 5/2? ", "--url", scripted.http_url, "--strategy", "majority", "--n", "5", "--answer", "boxed"]
    done = CliRunner().invoke(app, [*args, "--reference", "2.50", "--json"])
    assert done.exit_code == 0, done.output
    assert SearchResponse.model_validate_json(done.stdout).answer == "2.5"


@pytest.mark.service
def test_a_bad_answer_config_is_refused_with_the_reason(scripted):
    body = {"prompt": "What is 5/2? ", "strategy": "majority", "n": 2}
    assert "capturing group" in refusal(post(scripted, **body, answer={"how": "regex", "pattern": "x"}), 400)
    assert "not a valid regular expression" in refusal(
        post(scripted, **body, answer={"how": "regex", "pattern": "(x"}), 400
    )
    assert "boxed" in refusal(post(scripted, **body, answer={"how": "box"}), 400)
    assert "exactly one" in refusal(post(scripted, strategy="majority"), 400)
    both = post(scripted, **body, messages=[{"role": "user", "content": "hi"}])
    assert "exactly one" in refusal(both, 400)


# --- a conversation: `messages` ------------------------------------------------------------


@pytest.mark.slow
def test_search_with_messages_renders_them_for_the_policy_and_sends_the_reward_the_conversation(tiny_chat, tmp_path):
    """The tiny-chat pair: a ChatML policy and an ORM with its own tokenizer and template."""
    spec = tmp_path / "rewards.yaml"
    spec.write_text(f"rewards:\n  orm: {{type: model.outcome, path: {tiny_chat / 'orm'}, chat_template: true}}\n")
    row = json.loads((tiny_chat / "eval_prompts.jsonl").read_text().splitlines()[0])
    messages, reference = row["prompt"], str(row["answer"])
    with (
        RewardServer(RewardConfig(spec=spec, port=0, grpc_port=None)) as rm_server,
        BackgroundServer(
            ServerConfig(models={"policy": tiny_chat / "policy"}, port=0, rm_url=rm_server.http_url)
        ) as server,
        RewardClient.http(rm_server.http_url) as rewards,
        PolicyClient.http(server.http_url) as policy_client,
    ):
        res = policy_client.search(
            messages, strategy="best_of_n", reward="orm", n=3, seed=5, reference=reference, max_tokens=40
        )
        # the policy continued its own template's rendering, which the response reports
        assert res.prompt == render_prompt(load_tokenizer(tiny_chat / "policy"), messages)
        assert res.candidates and all(c.score is not None for c in res.candidates)
        assert any(c.final_answer is not None for c in res.candidates)  # the chat world answers `#### n`

        # the reward was sent the conversation: each score is the conversation's, not the rendered text's
        conversation = rewards.score("orm", [{"messages": messages, "response": c.text} for c in res.candidates])
        assert res.reward_id == conversation.reward_id
        assert [c.score for c in res.candidates] == pytest.approx([r.score for r in conversation.results], abs=1e-5)
        as_text = rewards.score("orm", [{"prompt": res.prompt, "response": c.text} for c in res.candidates])
        assert [r.score for r in as_text.results] != pytest.approx([c.score for c in res.candidates], abs=1e-3)

        # greedy, the search's one candidate is /v1/chat/completions' answer: the same prompt tokens
        greedy = search(
            server, messages=messages, strategy="best_of_n", reward="orm", n=1, temperature=0, max_tokens=40
        )
        chat = {"model": "policy", "messages": messages, "temperature": 0, "max_tokens": 40}
        completion = httpx.post(f"{server.http_url}/v1/chat/completions", json=chat, timeout=120)
        assert completion.status_code == 200, completion.text
        assert (
            greedy.candidates[0].text
            == ChatCompletionResponse.model_validate_json(completion.content).choices[0].message.content
        )


@pytest.mark.service
def test_messages_are_rendered_by_the_template_and_get_its_specials_only(scripted, backend):
    """The embedded template writes `<s>` itself: the prompt must not get a second one from the tokenizer."""
    messages = [{"role": "user", "content": "What is 5/2?"}]
    res = search(scripted, messages=messages, strategy="majority", n=5, round_size=5, answer={"how": "boxed"})
    assert res.prompt == "<s>Q: What is 5/2? A: " and res.answer == "2.5"
    want = backend.tokenizer(res.prompt, add_special_tokens=False)["input_ids"]
    assert backend.prompts[-5:] == [want] * 5 and want[:2] != [backend.tokenizer.bos_token_id] * 2
    assert search(scripted, prompt="What is 5/2? ", strategy="majority", n=5).prompt is None  # text: nothing rendered

    message = refusal(post(scripted, messages=messages, strategy="majority", n=1, model="plain"), 400)
    assert "no chat template" in message and "plain" in message
    chat = {"model": "plain", "messages": messages, "max_tokens": 4}
    message = refusal(httpx.post(f"{scripted.http_url}/v1/chat/completions", json=chat, timeout=60), 400)
    assert "no chat template" in message  # /v1/chat/completions too (it answered 500 before)


# --- refusals ------------------------------------------------------------------------------


def test_bad_requests_are_refused_with_what_to_change(policy):
    prompt = PROBLEMS[0].prompt
    message = refusal(post(policy, prompt=prompt, strategy="best_of_everything", reward="orm"), 400)
    assert all(name in message for name in STRATEGIES)
    assert "n=100000" in refusal(post(policy, prompt=prompt, strategy="majority", n=100_000), 400)
    assert "budget" in refusal(post(policy, prompt=prompt, strategy="majority", budget={"max_tokens": -1}), 400)
    assert "limit" in refusal(post(policy, prompt=prompt, strategy="majority", budget={"max_candidates": 10**9}), 400)
    assert "reward" in refusal(post(policy, prompt=prompt, strategy="best_of_n"), 400)
    assert "prompt" in refusal(post(policy, prompt="", strategy="majority"), 400)
    assert "temperatur" in refusal(post(policy, prompt=prompt, strategy="majority", temperatur=0.5), 400)
    assert "aggregate" in refusal(post(policy, prompt=prompt, strategy="dvts", reward="prm", aggregate="max"), 400)
    assert "nope" in refusal(post(policy, prompt=prompt, strategy="majority", model="nope"), 404)


def test_an_unknown_reward_is_rm_servers_404(policy):
    message = refusal(post(policy, prompt=PROBLEMS[0].prompt, strategy="best_of_n", reward="nope", n=2), 404)
    assert "unknown reward 'nope'" in message and "orm" in message and "prm" in message


@pytest.mark.service
def test_rm_server_down_is_503_majority_still_works_and_search_needs_a_key():
    dead_url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens there
    config = ServerConfig(
        models={"policy": EMBEDDED["policy"][1]},
        port=0,
        rm_url=dead_url,
        rm_max_retries=0,
        api_keys=("gen-key-for-tests:generate",),
    )
    body = {"prompt": PROBLEMS[0].prompt, "strategy": "best_of_n", "reward": "orm", "n": 2}
    with BackgroundServer(config) as server:
        url = f"{server.http_url}/v1/search"
        refusal(httpx.post(url, json=body, timeout=60), 401)
        refusal(httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}, timeout=60), 401)
        key = {"Authorization": "Bearer gen-key-for-tests"}
        message = refusal(httpx.post(url, json=body, headers=key, timeout=60), 503)
        assert "reward service" in message and dead_url in message
        majority = httpx.post(url, json={**body, "strategy": "majority"}, headers=key, timeout=60)
        assert majority.status_code == 200 and SearchResponse.model_validate_json(majority.content).reward_id is None


def metric(server, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels`."""
    text = httpx.get(f"{server.http_url}/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and labels.items() <= s.labels.items()
    )


def test_a_client_that_goes_away_stops_its_search(policy):
    sequences = lambda: metric(policy, "assay_policy_sequences_total", model="policy")
    gone = lambda: metric(policy, "assay_policy_requests_total", route="/v1/search", code="499")
    started, gone_before = sequences(), gone()
    # one sample per generate call, up to 128 of them: seconds of work if nothing stopped it
    body = {"prompt": PROBLEMS[0].prompt, "strategy": "majority", "n": 128, "round_size": 1, "seed": 3}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up: the search must not finish within 0.3s
        httpx.post(f"{policy.http_url}/v1/search", json=body, timeout=0.3)
    deadline = time.monotonic() + 10
    while gone() == gone_before:
        assert time.monotonic() < deadline, "the server did not notice that the client left"
        time.sleep(0.05)
    time.sleep(0.3)  # the sequence in flight is aborted, and the search thread ends on it
    stopped = sequences()
    time.sleep(0.5)
    assert sequences() == stopped and stopped - started < 128


# --- `assay search` ------------------------------------------------------------------------


def test_the_cli_prints_the_answer_candidates_and_usage(policy):
    app = typer.Typer()
    app.command()(search_cmd)
    runner = CliRunner()
    problem = PROBLEMS[0]
    args = [
        problem.prompt,
        "--url",
        policy.http_url,
        "--strategy",
        "weighted_best_of_n",
        "--n",
        "3",
        "--seed",
        "2",
        "--reference",
        str(problem.answer),
    ]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "answer:" in done.output and "candidates" in done.output and "usage:" in done.output
    as_json = runner.invoke(app, [*args, "--json"])
    res = SearchResponse.model_validate_json(as_json.stdout)
    assert f"answer: {res.answer}" in done.output and res.reward == "orm"
    refused = runner.invoke(app, [problem.prompt, "--url", policy.http_url, "--strategy", "nope"])
    assert refused.exit_code == 1 and "unknown strategy" in refused.output
