"""`assay models build`: rebuild the world's four checkpoints from seeds.

1. tokenizer  - character level, saved beside every checkpoint;
2. policy     - a tiny Llama trained from scratch by SFT on worked solutions;
3. samples    - the policy's own samples on training problems, labelled by the rule checkers;
4. prm        - token classifier initialised from the policy, BCE on a label at every
                character (is the response still on the correct track?), read at step ends;
5. orm        - sequence classifier initialised from the PRM, Bradley-Terry on
                (correct, incorrect) pairs of the policy's samples;
6. verifier   - the policy with the PRM's backbone, fine-tuned to answer `Correct? yes|no`.

The pipeline sits here, in the composition layer, rather than beside the world in `arith/`: it
trains with `assay.trainer`, and `assay.arith` stays a leaf that imports nothing else of ours.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    LlamaForTokenClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from assay.arith import world
from assay.arith.checks import is_correct
from assay.arith.tokenizer import build_tokenizer
from assay.arith.verifier import NO, YES, verifier_prompt
from assay.checkpoints import ARITH_DIR
from assay.generation import Sample, SamplingParams, sample
from assay.trainer.config import RMConfig, SFTConfig
from assay.trainer.reward_model import RankedGroup, StepExample, train_outcome_rm, train_process_rm
from assay.trainer.sft import train_sft

MAX_NEW_TOKENS = 48  # a correct level-2 solution is about 30 characters


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    # Slips at temperature 1 come from label smoothing (see trainer.sft): the policy's argmax
    # stays right while ~3% of its mass per token goes elsewhere, so samples fail by slipping.
    policy: SFTConfig = field(
        default_factory=lambda: SFTConfig(steps=2400, batch_size=64, lr=3e-3, warmup_steps=30, label_smoothing=0.03)
    )
    rollout_problems: int = 2048  # training problems the policy samples on for RM data
    rollouts_per_problem: int = 4
    prm: SFTConfig = field(default_factory=lambda: SFTConfig(steps=600, batch_size=32, lr=1e-3, warmup_steps=20))
    orm: RMConfig = field(default_factory=lambda: RMConfig(steps=300, batch_size=32, lr=5e-4, warmup_steps=20))
    verifier: SFTConfig = field(default_factory=lambda: SFTConfig(steps=400, batch_size=32, lr=1e-3, warmup_steps=20))


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
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    cfg: BuildConfig,
    on_batch: Callable[[int, int], None] | None = None,
) -> list[tuple[world.Problem, list[Sample]]]:
    """The policy's own samples (temperature 1) on fresh training problems (`on_batch`: see `sample`)."""
    probs = world.take("train", cfg.rollout_problems, seed=cfg.seed + 1)
    params = SamplingParams(temperature=1.0, max_new_tokens=MAX_NEW_TOKENS)
    prompts = [p.prompt for p in probs]
    out = sample(policy, tokenizer, prompts, params, n=cfg.rollouts_per_problem, seed=cfg.seed, on_batch=on_batch)
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
            groups.append(RankedGroup(prob.prompt, [g, *bad], best=0, worse=list(range(1, len(bad) + 1))))
    return groups


def prefix_examples(data: list[tuple[world.Problem, list[Sample]]]) -> list[StepExample]:
    """A label at every character of every response: is the text so far still on track?

    In this world the correct shown work is unique, so "on track" after k characters means the
    response's first k characters are those of the reference solution. At the end of each step
    this agrees with `arith.checks.step_labels` (what the PRM is read for) whenever the response
    is spaced as the reference is; the labels in between teach it where, inside a step, a slip
    happened.
    """
    out = []
    for prob, samples in data:
        ref = prob.solution
        for text in [s.text for s in samples] + [ref]:
            ends = [k for k in range(1, len(text) + 1) if not text[k - 1].isspace()]
            if ends:
                out.append(StepExample(prob.prompt, text, ends, [text[:k] == ref[:k] for k in ends]))
    return out


def verifier_examples(data: list[tuple[world.Problem, list[Sample]]], seed: int) -> Iterator[tuple[str, str]]:
    """Balanced yes/no examples, drawn forever in a seeded order."""
    yes: list[tuple[str, str]] = []
    no: list[tuple[str, str]] = []
    for prob, samples in data:
        for text in [s.text for s in samples] + [prob.solution]:
            ok = is_correct(prob, text)
            (yes if ok else no).append((verifier_prompt(prob.expression, text), YES if ok else NO))
    rng = random.Random(seed)
    while True:
        yield rng.choice(yes) if rng.random() < 0.5 else rng.choice(no)


def save(model, path: Path) -> None:
    """Weights and a fresh tokenizer (a used one may carry padding state into tokenizer.json)."""
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(path), safe_serialization=True)
    build_tokenizer().save_pretrained(str(path))


Progress = Callable[[str, int, int, float], None]  # (stage, step, total steps, loss)


def build(
    out_dir: Path = ARITH_DIR,
    cfg: BuildConfig | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
    skip_policy: bool = False,
) -> dict[str, float]:
    """Train and save the checkpoints under out_dir; returns seconds per stage.

    With skip_policy, the policy already in out_dir is kept and the reward models are rebuilt
    on its samples.
    """
    cfg = cfg or BuildConfig()
    torch.manual_seed(cfg.seed)
    timings: dict[str, float] = {}
    tokenizer = build_tokenizer()

    def tick(name: str, total: int) -> Callable[[int, float], None] | None:
        return None if progress is None else lambda step, loss: progress(name, step + 1, total, loss)

    def stage(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0
        log(f"{name}: {timings[name]:.0f}s")

    t0 = time.perf_counter()
    if skip_policy:
        policy = LlamaForCausalLM.from_pretrained(str(out_dir / "policy")).eval()
    else:
        policy = LlamaForCausalLM(llama_config(tokenizer, cfg))
        train_sft(policy, tokenizer, sft_examples(cfg.seed), cfg.policy, tick("policy", cfg.policy.steps))
        save(policy, out_dir / "policy")
        stage("policy", t0)

    t0 = time.perf_counter()
    data = rollouts(policy, tokenizer, cfg)
    n_ok = sum(is_correct(p, s.text) for p, ss in data for s in ss)
    log(f"rollouts: {n_ok}/{len(data) * cfg.rollouts_per_problem} correct")
    stage("rollouts", t0)

    # The PRM learns first: a label at every response character is dense supervision, and its
    # backbone then starts the ORM and the verifier, which get one label per response.
    t0 = time.perf_counter()
    prm = LlamaForTokenClassification(llama_config(tokenizer, cfg, num_labels=1))
    prm.model.load_state_dict(policy.model.state_dict())
    train_process_rm(prm, tokenizer, prefix_examples(data), cfg.prm, tick("prm", cfg.prm.steps))
    save(prm, out_dir / "prm")
    stage("prm", t0)

    t0 = time.perf_counter()
    orm = LlamaForSequenceClassification(llama_config(tokenizer, cfg, num_labels=1))
    orm.model.load_state_dict(prm.model.state_dict())
    with torch.no_grad():  # the token head has a bias, the sequence head none: ranking ignores it
        orm.score.weight.copy_(prm.score.weight)
    train_outcome_rm(orm, tokenizer, ranked_groups(data), cfg.orm, tick("orm", cfg.orm.steps))
    save(orm, out_dir / "orm")
    stage("orm", t0)

    t0 = time.perf_counter()
    verifier = LlamaForCausalLM(llama_config(tokenizer, cfg))
    verifier.lm_head.load_state_dict(policy.lm_head.state_dict())
    verifier.model.load_state_dict(prm.model.state_dict())
    train_sft(
        verifier, tokenizer, verifier_examples(data, cfg.seed), cfg.verifier, tick("verifier", cfg.verifier.steps)
    )
    save(verifier, out_dir / "verifier")
    stage("verifier", t0)
    return timings
