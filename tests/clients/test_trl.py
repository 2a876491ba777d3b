"""TRL's own GRPOTrainer, with Assay's reward functions, against a live rm_server on loopback.

What a new user would write: `RewardClient.http(url).as_reward_fn(...)` (and the async client's,
which TRL awaits on an event loop of its own, on a thread of its own) in `reward_funcs`, a dataset
with a GSM8K-style `answer` column, one row of it None. A few steps on the embedded policy; the
rewards TRL computed must be what rm_server answers for the same completions, with NaN (TRL's
None) exactly on the row without a reference.
"""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import pytest
import yaml

from assay.arith import world
from assay.checkpoints import ARITH_DIR
from assay.clients import AsyncRewardClient, RewardClient
from assay.rm_server.config import ServerConfig
from assay.rm_server.server import BackgroundServer
from tests.helpers import torch_threads

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SPEC = {
    "rewards": {
        "correct": {"type": "rule.math_equal", "answer_pattern": r"####\s*(-?\d+)\s*$"},
        "orm": {
            "type": "model.outcome",
            "path": str(ARITH_DIR / "orm"),
            "activation": "sigmoid",
            "chat_template": True,
            "max_tokens": 256,
        },
    }
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    spec = tmp_path_factory.mktemp("trl") / "rewards.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=0)) as s:
        yield s


def _trainer(out: Path, rows: list[dict], reward_funcs: list):
    """TRL's GRPOTrainer on the embedded policy, recording the rewards of every step as TRL computed them."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    class Recording(GRPOTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.seen: list[tuple[list, list, list[list[float]]]] = []  # prompts, completions, rewards per function

        def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
            rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
            self.seen.append((list(prompts), list(completions), rewards.T.tolist()))
            return rewards

    config = GRPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=32,
        max_steps=2,
        learning_rate=1e-4,
        beta=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        use_vllm=False,
        save_strategy="no",
        seed=0,
        shuffle_dataset=False,
    )
    path = ARITH_DIR / "policy"
    trainer = Recording(
        model=AutoModelForCausalLM.from_pretrained(path),
        reward_funcs=reward_funcs,
        args=config,
        processing_class=AutoTokenizer.from_pretrained(path, padding_side="left"),
        train_dataset=Dataset.from_list(rows),
    )
    return trainer


def _conversation(problem: world.Problem, earlier: world.Problem | None) -> list[dict[str, str]]:
    """A chat prompt; with an earlier exchange, its last user message alone is another text."""
    before = (
        []
        if earlier is None
        else [
            {"role": "user", "content": earlier.expression},
            {"role": "assistant", "content": earlier.solution},
        ]
    )
    return [{"role": "system", "content": "Show each step."}, *before, {"role": "user", "content": problem.expression}]


def test_grpo_trainer_scores_through_the_service(server, tmp_path):
    problems = world.take("train", 5, seed=0)
    # Conversational prompts, every other one with an earlier exchange; a GSM8K-style `answer` column
    # (found without reference_key), one row None; `level` travels as metadata.
    rows = [
        {
            "prompt": _conversation(p, problems[4] if i % 2 else None),
            "answer": None if i == 1 else str(p.answer),
            "level": 2,
        }
        for i, p in enumerate(problems[:4])
    ]
    answers = {str(r["prompt"]): r["answer"] for r in rows}
    client = AsyncRewardClient.grpc(server.grpc_target)
    with RewardClient.http(server.http_url) as rm:
        correct = rm.as_reward_fn("correct")  # sync
        orm = asyncio.run(client.as_reward_fn("orm"))  # async, made on a loop that is gone when TRL awaits it
        trainer = _trainer(tmp_path, rows, [correct, orm])
        with torch_threads(1):
            trainer.train()

        assert len(trainer.seen) == 2
        last_user_differs = []
        for prompts, completions, (got_correct, got_orm) in trainer.seen:
            answer = [answers[str(p)] for p in prompts]
            texts = [c[-1]["content"] for c in completions]
            items = [{"messages": p, "response": t} for p, t in zip(prompts, texts, strict=True)]
            want_correct = [
                r.score
                for r in rm.score("correct", [{**i, "reference": a or "0"} for i, a in zip(items, answer)]).results
            ]
            for got, want, a in zip(got_correct, want_correct, answer, strict=True):
                assert math.isnan(got) if a is None else got == want  # no reference: no reward for that row only
            assert got_orm == pytest.approx([r.score for r in rm.score("orm", items).results], rel=1e-4)
            # what the old reward function sent, the last user message's text, scores otherwise
            last_user = [{"prompt": p[-1]["content"], "response": t} for p, t in zip(prompts, texts, strict=True)]
            last_user_differs += [
                g != pytest.approx(r.score, rel=1e-2) for g, r in zip(got_orm, rm.score("orm", last_user).results)
            ]
    assert any(a is None for prompts, _, _ in trainer.seen for a in (answers[str(p)] for p in prompts))
    assert any(last_user_differs)
    asyncio.run(client.close())
