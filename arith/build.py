"""`assay models build`: rebuild the world's four checkpoints from seeds.

1. tokenizer  - character level, saved beside every checkpoint;
2. policy     - a tiny Llama trained from scratch by SFT on worked solutions;
3. samples    - the policy's own samples on training problems, labelled by the rule checkers;
4. orm        - sequence classifier initialised from the policy, Bradley-Terry on
                (correct, incorrect) pairs of those samples;
5. prm        - token classifier initialised from the policy, BCE on per-step labels;
6. verifier   - the policy fine-tuned to answer `Correct? yes|no` on the same samples.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedTokenizerBase,
)

from arith import world
from arith.checks import is_correct, segments, step_labels
from arith.tokenizer import build_tokenizer
from arith.verifier import NO, YES, verifier_prompt
from assay.checkpoints import ARITH_DIR
from assay.generation import Sample, SamplingParams, sample
from trainer.reward_model import RankedGroup, RMConfig, StepExample, train_outcome_rm, train_process_rm
from trainer.sft import SFTConfig, train_sft

MAX_NEW_TOKENS = 48  # a correct level-2 solution is about 30 characters


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    policy: SFTConfig = SFTConfig(steps=800, batch_size=64, lr=3e-3, warmup_steps=30)
    rollout_problems: int = 1536  # training problems the policy samples on for RM data
    rollouts_per_problem: int = 4
    orm: RMConfig = RMConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20)
    prm: SFTConfig = SFTConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20)
    verifier: SFTConfig = SFTConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20)


def llama_config(tokenizer: PreTrainedTokenizerBase, cfg: BuildConfig, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.layers,
        num_attention_heads=cfg.heads,
        num_key_value_heads=cfg.heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **extra,
    )


def sft_examples(seed: int) -> Iterator[tuple[str, str]]:
    for p in world.problems("train", seed):
        yield p.prompt, p.solution


def rollouts(
    policy: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, cfg: BuildConfig
) -> list[tuple[world.Problem, list[Sample]]]:
    """The policy's own samples (temperature 1) on fresh training problems."""
    probs = world.take("train", cfg.rollout_problems, seed=cfg.seed + 1)
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)
    out = sample(policy, tokenizer, [p.prompt for p in probs], params, n=cfg.rollouts_per_problem, seed=cfg.seed)
    return list(zip(probs, out))


def ranked_groups(data: list[tuple[world.Problem, list[Sample]]]) -> list[RankedGroup]:
    """One group per (problem, correct sample) with the problem's incorrect samples as worse.

    Problems the policy always or never solves give no pair; for those, the reference solution
    stands in as the correct candidate so the RM also sees the policy's hardest failures.
    """
    groups = []
    for prob, samples in data:
        good = [s.text for s in samples if is_correct(prob, s.text)]
        bad = [s.text for s in samples if not is_correct(prob, s.text)]
        if not bad:
            continue
        if not good:
            good = [prob.solution]
        for g in good:
            groups.append(RankedGroup(prob.prompt, [g] + bad, best=0, worse=list(range(1, len(bad) + 1))))
    return groups


def step_examples(data: list[tuple[world.Problem, list[Sample]]]) -> list[StepExample]:
    out = []
    for prob, samples in data:
        for text in [s.text for s in samples] + [prob.solution]:
            segs = segments(text)
            if segs:
                out.append(StepExample(prob.prompt, text, [s.end for s in segs], step_labels(prob, text)))
    return out


def verifier_examples(
    data: list[tuple[world.Problem, list[Sample]]], seed: int
) -> Iterator[tuple[str, str]]:
    """Balanced yes/no examples, drawn forever in a seeded order."""
    yes, no = [], []
    for prob, samples in data:
        for text in [s.text for s in samples] + [prob.solution]:
            (yes if is_correct(prob, text) else no).append(
                (verifier_prompt(prob.expression, text), YES if is_correct(prob, text) else NO)
            )
    rng = random.Random(seed)
    while True:
        yield rng.choice(yes) if rng.random() < 0.5 else rng.choice(no)


def save(model, tokenizer: PreTrainedTokenizerBase, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    tokenizer.save_pretrained(str(path))


def build(
    out_dir: Path = ARITH_DIR,
    cfg: BuildConfig = BuildConfig(),
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train and save all four checkpoints under out_dir; returns seconds per stage."""
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    tokenizer = build_tokenizer()

    def stage(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log(f"{name}: {timings[name]:.0f}s")

    t0 = time.perf_counter()
    policy = LlamaForCausalLM(llama_config(tokenizer, cfg))
    train_sft(policy, tokenizer, sft_examples(cfg.seed), cfg.policy)
    save(policy, tokenizer, out_dir / "policy")
    stage("policy", t0)

    t0 = time.perf_counter()
    data = rollouts(policy, tokenizer, cfg)
    n_ok = sum(is_correct(p, s.text) for p, ss in data for s in ss)
    log(f"rollouts: {n_ok}/{len(data) * cfg.rollouts_per_problem} correct")
    stage("rollouts", t0)

    t0 = time.perf_counter()
    orm = LlamaForSequenceClassification(llama_config(tokenizer, cfg, num_labels=1))
    orm.model.load_state_dict(policy.model.state_dict())
    train_outcome_rm(orm, tokenizer, ranked_groups(data), cfg.orm)
    save(orm, tokenizer, out_dir / "orm")
    stage("orm", t0)

    t0 = time.perf_counter()
    prm = LlamaForTokenClassification(llama_config(tokenizer, cfg, num_labels=1))
    prm.model.load_state_dict(policy.model.state_dict())
    train_process_rm(prm, tokenizer, step_examples(data), cfg.prm)
    save(prm, tokenizer, out_dir / "prm")
    stage("prm", t0)

    t0 = time.perf_counter()
    verifier = LlamaForCausalLM(llama_config(tokenizer, cfg))
    verifier.load_state_dict(policy.state_dict())
    train_sft(verifier, tokenizer, verifier_examples(data, cfg.seed), cfg.verifier)
    save(verifier, tokenizer, out_dir / "verifier")
    stage("verifier", t0)
    return timings
