"""Where an online run's prompts come from, without the services: the arithmetic world, a user's file
(chat messages rendered with the policy's template), the eval set, and what the reward is sent."""

from __future__ import annotations

import json
import random

import pytest

from assay.arith import world
from assay.checkpoints import ARITH_DIR, load_tokenizer
from assay.data import DataError
from assay.rm_server.protocol import RewardInfo
from assay.trainer.config import PPOConfig
from assay.trainer.evaluation import pass_reward
from assay.trainer.online import Rollout, score
from assay.trainer.ppo import train as ppo_train
from assay.trainer.prompts import ArithPrompts, DatasetPrompts, Prompt, load_prompt_files, load_ptx_data

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(ARITH_DIR / "policy")  # a Llama-style template: `{{ bos_token }}Q: ... A: `


def _chat_file(path, n=10, bad_row=None):
    with open(path, "w") as f:
        for i, p in enumerate(world.take("train", n, seed=5)):
            question = p.prompt.removeprefix("Q: ").removesuffix(" A: ")
            prompt = 7 if i == bad_row else [{"role": "user", "content": question}]
            f.write(json.dumps({"prompt": prompt, "answer": str(p.answer), "level": 2, "id": f"q{i}"}) + "\n")
    return path


def test_the_arithmetic_world_is_drawn_as_it_always_was():
    """The default source gives the prompts and references the trainer drew before data files existed."""
    rng = random.Random(3 * 1_000_003 + 5)
    before = world.take("train", 8, seed=rng.randrange(2**31))
    assert ArithPrompts().draw(5, 8, seed=3) == [Prompt(p.prompt, str(p.answer)) for p in before]


def test_a_files_rows_are_drawn_once_per_epoch_as_a_function_of_seed_and_step():
    source = DatasetPrompts("f.jsonl", [Prompt(f"p{i}") for i in range(10)])
    steps = [source.draw(step, 4, seed=1) for step in range(1, 6)]  # 20 draws: two epochs of 10
    flat = [p.text for s in steps for p in s]
    assert sorted(flat[:10]) == sorted(flat[10:]) == sorted(f"p{i}" for i in range(10))
    assert flat[:10] != flat[10:]  # each epoch in its own order
    assert source.draw(3, 4, seed=1) == steps[2]  # a resumed run sees the same prompts at the same step
    assert source.draw(3, 4, seed=2) != steps[2]


def test_chat_prompts_are_rendered_with_the_policys_template_and_keep_the_conversation(tmp_path, tok):
    files = load_prompt_files(tok, str(_chat_file(tmp_path / "p.jsonl")), eval_fraction=0.3, seed=0)
    assert len(files.train.prompts) == 7 and len(files.eval) == 3 and files.skipped == []
    first = files.train.prompts[0]
    question = first.messages[0]["content"]
    # the template's leading <s> is left to the encoding, which adds it: one bos, not two
    assert first.text == f"Q: {question} A: "
    assert tok(first.text)["input_ids"].count(tok.bos_token_id) == 1
    assert first.reference == str(world.parse_prompt(first.text).answer)  # found under `answer`
    assert first.metadata["level"] == 2 and set(first.metadata) == {"level", "id"}
    assert {p.metadata["id"] for p in files.eval}.isdisjoint(p.metadata["id"] for p in files.train.prompts)


def test_a_bad_row_is_named_or_skipped_and_counted(tmp_path, tok):
    path = _chat_file(tmp_path / "bad.jsonl", bad_row=4)
    with pytest.raises(DataError, match=r"bad\.jsonl row 4, column 'prompt'"):
        load_prompt_files(tok, str(path))
    files = load_prompt_files(tok, str(path), skip_bad_rows=True)
    assert len(files.train.prompts) == 9 and [e.row for e in files.skipped] == [4]
    assert files.train.describe() == {"data": str(path), "data_rows": 9, "data_skipped_rows": 1}
    with pytest.raises(ValueError, match="not both"):
        load_prompt_files(tok, str(path), eval_data=str(path), eval_fraction=0.5)


def test_the_reward_gets_the_conversation_the_reference_and_the_other_columns():
    seen = {}

    def reward(prompts, completions, **kw):
        seen.update(prompts=prompts, completions=completions, **kw)
        return [1.0, float("nan")]

    chat = Prompt("<rendered>", "5", [{"role": "user", "content": "2+3"}], {"level": 1, "prompts": "clash"})
    plain = Prompt("Q: 1+1 A: ", None, None, {"source": "x"})
    rollouts = [Rollout(p, [], [], text, [], 1) for p, text in ((chat, "#### 5"), (plain, "#### 2"))]
    assert score(reward, rollouts) == [1.0, None]  # a non-finite reward is a failed one, never 0
    assert seen["prompts"] == [[{"role": "user", "content": "2+3"}], "Q: 1+1 A: "]
    assert seen["completions"] == [[{"role": "assistant", "content": "#### 5"}], "#### 2"]
    assert seen["reference"] == ["5", None]
    assert seen["level"] == [1, None] and seen["source"] == [None, "x"]  # a column TRL's names would clash with stays


def test_the_pass_rate_reward_is_a_served_rule_with_references():
    def info(name, kind):
        return RewardInfo(
            name=name,
            type=kind,
            reward_id=f"sha256:{name}",
            needs_reference=kind.startswith("rule.m"),
            granularities=["outcome"],
            pairwise=False,
            pinned=True,
        )

    served = [info("orm", "model.outcome"), info("exact", "rule.exact_match"), info("correct", "rule.math_equal")]
    with_refs, without = [Prompt("q", "1")], [Prompt("q")]
    assert pass_reward(served, "auto", with_refs) == "correct"  # math_equal before exact_match
    assert pass_reward(served, "auto", without) is None  # nothing to check against
    assert pass_reward(served, "none", with_refs) is None
    assert pass_reward(served, "exact", with_refs) == "exact"
    with pytest.raises(ValueError, match=r"'orm' is a model\.outcome reward"):
        pass_reward(served, "orm", with_refs)
    with pytest.raises(ValueError, match="'nope' is not served"):
        pass_reward(served, "nope", with_refs)


def test_ppo_on_a_users_prompts_never_mixes_in_arithmetic_demonstrations(tmp_path, tok):
    source = DatasetPrompts("p.jsonl", [Prompt("hello")])
    with pytest.raises(ValueError, match="--ptx-data FILE"):
        ppo_train(PPOConfig(gamma_ptx=0.1), None, tok, None, None, None, None, prompts=source)
    demos = tmp_path / "demos.jsonl"
    demos.write_text(
        json.dumps({"messages": [{"role": "user", "content": "2+3"}, {"role": "assistant", "content": "#### 5"}]})
        + "\n"
    )
    pairs, skipped = load_ptx_data(tok, str(demos))
    assert pairs == [("Q: 2+3 A: ", "#### 5")] and skipped == []
