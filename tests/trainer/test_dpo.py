"""DPO: the loss by hand, offline training on arithmetic pairs, and one iterative round against the
real services (search through policy_server, scores from rm_server, weights pushed back)."""

from __future__ import annotations

import math

import pytest
import torch

from assay.arith import world
from assay.clients import PolicyClient, RewardClient
from assay.generation import SamplingParams, sample
from assay.trainer.dpo import (
    DPOConfig,
    Pair,
    dpo_loss,
    dpo_step,
    iterative_dpo,
    make_optimizer,
    pair_from_search,
    pair_logps,
    sequence_logps,
    train_offline,
)
from assay.trainer.models import reference
from assay.trainer.online import RewardMismatch

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("one_torch_thread")]  # tests/conftest.py


@pytest.fixture(scope="module")
def embedded():
    """The embedded policy and its tokenizer (the `policy` fixture here is a PolicyClient)."""
    from assay.checkpoints import load_embedded

    return load_embedded("policy")


def off_by_one(p: world.Problem) -> str:
    """The worked solution with a final answer one too high: a well-formed wrong response."""
    return p.solution.rsplit(" ", 1)[0] + f" {p.answer + 1}"


def test_dpo_loss_by_hand():
    # h = beta * ((-1 - -2) - (-3 - -2)) = 0.5 * 2 = 1
    loss, r_w, r_l = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert (r_w.item(), r_l.item()) == pytest.approx((0.5, -0.5))
    smoothed, _, _ = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.0]),
        beta=0.5,
        label_smoothing=0.2,
    )
    assert smoothed.item() == pytest.approx(0.8 * math.log(1 + math.exp(-1)) + 0.2 * math.log(1 + math.e), rel=1e-6)


def test_policy_equal_to_reference_gives_log2_and_one_step_moves_the_pair_apart(tiny_lm, tokenizer):
    pair = [Pair("Q: 1+2 A: ", "1+2=3 #### 3", "1+2=4 #### 4")]
    ref = reference(tiny_lm)
    config = DPOConfig(lr=1e-3)
    metrics = dpo_step(tiny_lm, ref, tokenizer, pair, make_optimizer(tiny_lm, config), config)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["chosen_reward"] == metrics["rejected_reward"] == 0.0
    with torch.no_grad():
        pi_w, pi_l, _ = pair_logps(tiny_lm, tokenizer, pair)
        ref_w, ref_l, _ = pair_logps(ref, tokenizer, pair)
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta)
    assert r_w.item() > 0 > r_l.item()  # chosen made likelier, rejected less likely
    assert loss.item() < math.log(2)


def test_completion_log_probs_mask_the_prompt_and_count_eos(tokenizer, tiny_lm):
    with torch.no_grad():
        a, _, n = pair_logps(tiny_lm, tokenizer, [Pair("Q: 1+2 A: ", "3", "4")])
        b, _, _ = pair_logps(tiny_lm, tokenizer, [Pair("Q: 5+6 A: ", "3", "4")])
    assert n.item() == 2  # "3" and eos
    assert a.item() != b.item()  # conditioned on the prompt, but summed over the completion only
    assert a.item() < 0


def test_loss_falls_on_a_fixed_batch_of_arithmetic_pairs(embedded):
    model, tokenizer = embedded
    model = reference(model).requires_grad_(True)  # the module fixture stays untouched
    pairs = [Pair(p.prompt, p.solution, off_by_one(p)) for p in world.take("train", 8, seed=0)]
    history = train_offline(model, tokenizer, pairs, DPOConfig(lr=3e-4, batch_size=8, epochs=5))
    assert history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["reward_accuracy"] == 1.0 and history[-1]["margin"] > 0


def test_config_refuses_nonsense():
    for bad in (
        {"beta": 0},
        {"n": 1},
        {"strategy": "majority"},
        {"label_smoothing": 0.5},
        {"ref_update": "x"},
        {"min_margin": -1},
    ):
        with pytest.raises(ValueError):
            DPOConfig(**bad)


def test_iterative_dpo_refuses_held_out_prompts(embedded):
    with pytest.raises(ValueError, match="held-out"):
        iterative_dpo(*embedded, None, DPOConfig(), [world.eval_problems(1)[0].prompt])  # type: ignore[arg-type]


# --- against the real services --------------------------------------------------------------


class RecordingPolicy(PolicyClient):
    """Real searches, recorded. With `swap_reward_id_on=k`, the k-th search answers with a changed
    `reward_id`: a test double for that one field, to simulate rm_server's reward changing mid-run."""

    def __init__(self, url: str, swap_reward_id_on: int | None = None) -> None:
        super().__init__(url)
        self.searches: list[tuple[str, object]] = []
        self.swap_on = swap_reward_id_on

    def search(self, prompt, **kw):
        resp = super().search(prompt, **kw)
        self.searches.append((prompt, resp))
        if len(self.searches) == self.swap_on:
            resp = resp.model_copy(update={"reward_id": resp.reward_id + "-changed"})
        return resp


@pytest.fixture
def restores_weights(services, embedded):
    """The services are shared by the session (conftest): leave them serving the embedded policy."""
    yield
    with PolicyClient.http(services.policy_url) as client:
        client.update_weights(embedded[0].state_dict())


@pytest.mark.e2e
def test_one_round_searches_trains_and_pushes(services, embedded, restores_weights):
    model, tokenizer = embedded
    model = reference(model).requires_grad_(True)
    ref = reference(model)
    prompts = [p.prompt for p in world.take("train", 4, seed=3)]
    config = DPOConfig(rounds=1, prompts_per_round=4, n=4, lr=1e-3, epochs=4, batch_size=4, concurrency=1)
    with RecordingPolicy(services.policy_url) as client, RewardClient.http(services.rm_url) as rm:
        v0 = client.weight_version()
        rounds: list[tuple[dict, list[Pair]]] = []
        history = iterative_dpo(model, tokenizer, client, config, prompts, on_round=lambda m, p: rounds.append((m, p)))
        assert len(history) == 1 and rounds[0][0] is history[0]
        metrics, pairs = rounds[0]

        # pairs are the top- and bottom-scored candidates of the searches
        assert metrics["pairs"] == len(pairs) >= 1
        by_prompt = dict(client.searches)
        for pair in pairs:
            scored = [c for c in by_prompt[pair.prompt].candidates if c.score is not None]
            scores = [c.score for c in scored]
            assert pair.chosen_score == max(scores) > pair.rejected_score == min(scores)
            assert {pair.chosen, pair.rejected} <= {c.text for c in scored}

        # one push per round, and the server now serves exactly the local weights
        assert client.weight_version() == metrics["weight_version"] == v0 + 1
        prompt = prompts[0]
        served = client.complete(prompt, temperature=0.0, max_tokens=48, logprobs=True).choices[0]
        local = sample(model, tokenizer, [prompt], SamplingParams(temperature=0.0, max_new_tokens=48))[0][0]
        assert served.text == local.text and served.weight_version == v0 + 1
        n = len(served.logprobs.token_logprobs)
        assert served.logprobs.token_logprobs == pytest.approx(local.logprobs[:n], abs=1e-4)
        with torch.no_grad():  # not vacuous: the trained model scores the same tokens differently
            trained_lp, _ = _completion_logp(model, tokenizer, prompt, local.text)
            ref_lp, _ = _completion_logp(ref, tokenizer, prompt, local.text)
        assert abs(trained_lp - ref_lp) > 1e-3

        # the reward id the run recorded is rm_server's for the reward
        assert metrics["reward_id"] == rm.reward_id("orm")


def _completion_logp(model, tokenizer, prompt: str, text: str) -> tuple[float, int]:
    logp, n = sequence_logps(model, tokenizer, [prompt], [text])
    return logp.item(), n.item()


@pytest.mark.e2e
def test_a_changed_reward_id_stops_the_run(services, embedded):
    model, tokenizer = embedded
    model = reference(model).requires_grad_(True)
    prompts = [p.prompt for p in world.take("train", 2, seed=4)]
    config = DPOConfig(rounds=1, prompts_per_round=2, n=2, concurrency=1)
    with RecordingPolicy(services.policy_url, swap_reward_id_on=2) as client:
        v0 = client.weight_version()
        with pytest.raises(RewardMismatch, match="changed mid-run"):
            iterative_dpo(model, tokenizer, client, config, prompts)
        assert client.weight_version() == v0  # stopped before training or pushing anything


def test_pair_from_search_leaves_out_failed_and_tied_candidates():
    from assay.policy_server.protocol import SearchCandidate

    def resp(*scores):
        cands = [
            SearchCandidate(
                text=f"r{i}",
                score=s,
                final_answer=None,
                steps=None,
                num_tokens=1,
                finish_reason="stop",
                correct=None,
                error=None if s is not None else "failed",
            )
            for i, s in enumerate(scores)
        ]
        return type("R", (), {"candidates": cands})()

    assert pair_from_search("p", resp(0.2, None, 0.9)) == Pair("p", "r2", "r0", 0.9, 0.2)  # None is not 0
    assert pair_from_search("p", resp(0.5, 0.5, None)) is None
    assert pair_from_search("p", resp(0.9, None)) is None
    assert pair_from_search("p", resp(0.6, 0.5), min_margin=0.2) is None
