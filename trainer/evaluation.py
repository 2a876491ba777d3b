"""What an online run measures on held-out prompts, at step 0 and every `eval_every` steps.

- `ArithEval` (the default, the embedded world): `heldout_pass1`, pass@1 at T = 1.0 on the first
  `eval_problems` held-out problems, sampled in the trainer's process from its own weights and
  checked by the world's rule checker. Its figures are comparable across every run ever made.
- `DatasetEval` (`--eval-data FILE`, or `--eval-fraction` of `--data`): `samples` completions per
  eval prompt at T = 1.0 from the policy server, which serves the trainer's weights at that point,
  with one fixed seed, so two evaluations differ only by the weights. Every completion is scored
  by the training reward, logged as `eval/<reward>/mean`, and by a pass-rate reward when one is
  served (a rule scoring 1/0 against the reference, like `correct` = rule.math_equal), logged as
  `eval/<name>/pass_rate` over the rows that have a reference. Failed scores are counted
  (`eval/<name>/failed`), never averaged in as 0. Keys name the reward; its id is in
  `reward_ids()`, which the run records in config.json and in each checkpoint and checks on resume.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from assay.arith import world
from assay.arith.checks import is_correct
from assay.clients.reward import RewardClient
from assay.rm_server.protocol import RewardInfo
from assay.trainer.config import RLConfig
from assay.trainer.online import RewardFn, Run, reward_id_of, sample_groups, score, sync_weights
from assay.trainer.prompts import Prompt

EVAL_SEED = 1234  # the same samples' seed at every evaluation: only the weights change between them
PASS_RULES = ("rule.math_equal", "rule.exact_match")  # rules scoring 1/0 against a reference, preferred first


def heldout_pass1(
    model, tokenizer, problems: int = 64, samples: int = 8, seed: int = EVAL_SEED, max_tokens: int = 48
) -> float:
    """pass@1 at temperature 1.0 on the first `problems` held-out problems: the share of correct
    samples, `samples` per problem, sampled in this process from the trainer's own weights."""
    from assay.generation import SamplingParams, sample

    probs = world.eval_problems(problems)
    was_training = model.training
    model.eval()
    out = sample(
        model,
        tokenizer,
        [p.prompt for p in probs],
        SamplingParams(temperature=1.0, max_new_tokens=max_tokens),
        n=samples,
        seed=seed,
    )
    model.train(was_training)
    return sum(is_correct(p, s.text) for p, row in zip(probs, out) for s in row) / (problems * samples)


class ArithEval:
    """The embedded world's held-out pass@1 (`heldout_pass1`)."""

    def reward_ids(self) -> dict[str, str]:
        return {}  # the world's own rule checker, no reward of rm_server

    def __call__(self, run: Run, version: int) -> dict[str, Any]:
        return {"heldout_pass1": heldout_pass1(run.model, run.tokenizer, run.config.eval_problems)}


@dataclass
class DatasetEval:
    """The rewards of the policy's completions of an eval set's prompts (module docstring)."""

    prompts: Sequence[Prompt]
    rewards: Mapping[str, RewardFn]  # name -> reward function (`as_reward_fn`); the training reward among them
    pass_rate: frozenset[str]  # names of rules scoring 1/0 against the reference: their mean is a pass rate
    samples: int = 4

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the eval set holds no prompts")

    def reward_ids(self) -> dict[str, str]:
        return {name: reward_id_of(fn) for name, fn in self.rewards.items()}

    def __call__(self, run: Run, version: int) -> dict[str, Any]:
        config = run.config
        # the server serves `version` (the trainer just pushed it) unless it restarted since
        version = sync_weights(run.policy, run.model, version, config.service_timeout_s)
        groups, _ = sample_groups(
            run.policy,
            self.prompts,
            self.samples,
            temperature=1.0,
            max_tokens=config.max_tokens,
            seed=EVAL_SEED,
            version=version,
            timeout_s=config.service_timeout_s,
        )
        rollouts = [r for g in groups for r in g]
        metrics: dict[str, Any] = {"eval_samples": len(rollouts)}
        for name, fn in self.rewards.items():
            passing = name in self.pass_rate
            # a rule needs the reference: rows without one are not part of its pass rate
            scored = [r for r in rollouts if r.prompt.reference is not None] if passing else rollouts
            values = score(fn, scored)
            good = [v for v in values if v is not None]
            metrics[f"eval/{name}/{'pass_rate' if passing else 'mean'}"] = sum(good) / len(good) if good else None
            metrics[f"eval/{name}/failed"] = len(values) - len(good)
        return metrics


def pass_reward(served: Sequence[RewardInfo], wanted: str, prompts: Sequence[Prompt]) -> str | None:
    """The reward whose pass rate an eval set logs: `wanted` by name (checked: a served rule that
    needs a reference), none for "none", and for "auto" the served reward of the first type in
    PASS_RULES, when some eval prompt has a reference to check against."""
    if wanted == "none":
        return None
    if wanted != "auto":
        info = next((r for r in served if r.name == wanted), None)
        if info is None:
            raise ValueError(
                f"eval_pass_reward {wanted!r} is not served; rm_server has {', '.join(r.name for r in served)}"
            )
        if info.type not in PASS_RULES:
            raise ValueError(
                f"eval_pass_reward {wanted!r} is a {info.type} reward; a pass rate needs a rule scoring 1/0 "
                f"against the reference ({', '.join(PASS_RULES)})"
            )
        return wanted
    if not any(p.reference is not None for p in prompts):
        return None
    for kind in PASS_RULES:
        for info in served:
            if info.type == kind:
                return info.name
    return None


def for_eval_set(rm: RewardClient, config: RLConfig, reward_fn: RewardFn, prompts: Sequence[Prompt]) -> DatasetEval:
    """The evaluation of an eval set's first `eval_problems` prompts: the training reward
    (`reward_fn`, config.reward) and the pass-rate reward `pass_reward` picks among `rm`'s."""
    held = list(prompts[: config.eval_problems])
    passing = pass_reward(rm.rewards().rewards, config.eval_pass_reward, held)
    rewards = {config.reward: reward_fn}
    if passing is not None and passing != config.reward:
        rewards[passing] = rm.as_reward_fn(passing)
    return DatasetEval(held, rewards, frozenset([passing] if passing else []), samples=config.eval_samples)
