"""`assay models tiny-chat`: a real-shaped chat policy, an outcome RM and data files, in a minute or two.

The embedded checkpoints read characters and have no chat template, so nothing that runs on them
exercises what real checkpoints do: byte-level BPE, special tokens, chat templates, a reward model
whose tokenizer and template are not the policy's. This builds that pair from seeds, on the chat
version of the arithmetic world (`arith/chat.py`), and writes what a user would bring:

    DIR/policy                  Qwen2ForCausalLM; byte-level BPE (digits one token each, as Qwen's
                                pre-tokenizer splits them), ChatML template, eos `<|im_end|>`; SFT
    DIR/orm                     LlamaForSequenceClassification (1 logit); its own byte-level BPE
                                (GPT-2's pre-tokenizer: digits merge into numbers), Zephyr-style
                                template (`<|user|>`, `<|assistant|>`, `</s>`); Bradley-Terry
    DIR/prompts.jsonl           `prompt` (messages) + `answer`, training problems
    DIR/eval_prompts.jsonl      the same from held-out problems
    DIR/demonstrations.jsonl    `messages`, training problems
    DIR/preferences.jsonl       `prompt` + `chosen` + `rejected` (assistant messages) + `subset`
    DIR/eval_preferences.jsonl  the same from held-out problems
    DIR/rm.yaml                 a reward spec serving `orm` (chat_template: true) and `correct`
    DIR/build.json              the seed, the figures measured at the end of the build, seconds per stage

Training rows come from the world's train split and evaluation rows from its held-out split, so
no evaluation row was ever trained on. The policy learns from conversations like the
demonstrations (more of them, mostly easy one-step problems: a brief SFT teaches those, and GRPO
then has answers to reward); the ORM from pairs like the preference file's (a worked answer over
each kind of wrong one) on more training problems. Both models and every file are deterministic
from the seed; `build.json` records the figures they reached.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from assay.arith import chat, world
from assay.arith.checks import is_correct
from assay.chat import render_exchange, render_prompt
from assay.generation import SamplingParams, sample
from assay.scoring import score_outcome
from assay.trainer.config import RMConfig, SFTConfig
from assay.trainer.reward_model import RankedGroup, train_outcome_rm
from assay.trainer.sft import train_sft

Message = chat.Message
LEVELS = (1, 2)  # one-step sums to 20 (easy) and the world's default two-step problems
SFT_POOL = {1: 600, 2: 20000}  # training problems per level the policy learns from
EASY_SHARE = 0.7  # of SFT examples that are level 1
MAX_NEW_TOKENS = 40  # a level-2 answer is about 25 policy tokens

# Qwen2's pre-tokenizer split: words, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
POLICY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # pad, turn open, turn close (eos)
# The ORM's template: bos, then `<|role|>\n content </s>` per turn; a scored text ends at `</s>`.
ZEPHYR = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
ORM_SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinyChatConfig:
    seed: int = 0
    policy_vocab: int = 768
    policy_width: int = 64
    policy_layers: int = 3
    orm_vocab: int = 512
    orm_width: int = 64
    orm_layers: int = 2
    policy: SFTConfig = field(default_factory=lambda: SFTConfig(steps=800, batch_size=32, lr=5e-3, warmup_steps=30))
    orm: RMConfig = field(default_factory=lambda: RMConfig(steps=300, batch_size=32, lr=1e-3, warmup_steps=20))
    rows: int = 512  # prompts, demonstrations and preferences from training problems
    orm_problems: int = 1200  # training problems the ORM learns to rank answers on
    eval_rows: int = 96  # prompts and preferences from held-out problems (level 1 holds out only 65)
    check_problems: int = 48  # held-out problems per level the policy is checked on after the build


# --- tokenizers ----------------------------------------------------------------------------------


def _bpe(corpus: list[str], vocab_size: int, specials: list[str], split: pre_tokenizers.PreTokenizer) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = split
    tok.decoder = decoders.ByteLevel()
    # Every byte is in the initial alphabet, so any UTF-8 text encodes and decodes back exactly.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def policy_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's split (one token per digit), ChatML, eos `<|im_end|>`, no bos."""
    split = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, vocab_size, POLICY_SPECIALS, split),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>"],
        chat_template=CHATML,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def orm_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE with GPT-2's split (numbers merge), bos/eos `<s>`/`</s>`, role tokens, its own template."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_bpe(corpus, vocab_size, ORM_SPECIALS, pre_tokenizers.ByteLevel(add_prefix_space=False)),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        chat_template=ZEPHYR,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def corpus(problems: list[world.Problem], rng: random.Random) -> list[str]:
    """Text the tokenizers learn their merges from: questions, system prompts, right and wrong answers."""
    out = []
    for p in problems:
        wrong = chat.wrong_solution(p, rng.choice(chat.REJECTION_KINDS), rng)
        turns = [*chat.prompt_messages(p, rng), chat.answer_message(p.solution), chat.answer_message(wrong)]
        out += [f"{m['role']}\n{m['content']}" for m in turns]  # role names become tokens, as in real vocabularies
    return out


# --- data rows -----------------------------------------------------------------------------------


def problems(split: str, n: int, seed: int) -> list[world.Problem]:
    """n problems of a split, the levels in turn (deterministic from the seed)."""
    streams = [world.problems(split, seed, level) for level in LEVELS]
    return [next(streams[i % len(streams)]) for i in range(n)]


def prompt_rows(probs: list[world.Problem], rng: random.Random) -> list[dict[str, Any]]:
    """TRL's conversational prompt rows, with a GSM8K-style `answer` column and the problem's level."""
    return [{"prompt": chat.prompt_messages(p, rng), "answer": str(p.answer), "level": _level(p)} for p in probs]


def demonstration_rows(probs: list[world.Problem], rng: random.Random) -> list[dict[str, Any]]:
    return [{"messages": [*chat.prompt_messages(p, rng), chat.answer_message(p.solution)]} for p in probs]


def preference_rows(probs: list[world.Problem], rng: random.Random) -> list[dict[str, Any]]:
    """TRL's conversational preference rows (explicit prompt), the kind of wrong answer as `subset`."""
    rows = []
    for i, p in enumerate(probs):
        kind = chat.REJECTION_KINDS[i % len(chat.REJECTION_KINDS)]
        rows.append(
            {
                "prompt": chat.prompt_messages(p, rng),
                "chosen": [chat.answer_message(p.solution)],
                "rejected": [chat.answer_message(chat.wrong_solution(p, kind, rng))],
                "subset": kind,
            }
        )
    return rows


def _level(p: world.Problem) -> int:
    return 1 if len(p.operands) == 2 else 2


def sft_examples(tokenizer: PreTrainedTokenizerFast, seed: int) -> Iterator[tuple[str, str]]:
    """(rendered prompt, worked answer) forever, each time a new phrasing: mostly easy (level 1)
    problems, which a brief SFT can teach, and some level 2. Level 1 has only 735 training
    problems, so problems are drawn from pools."""
    rng = random.Random(f"tiny-chat/sft/{seed}")
    easy, hard = (world.take("train", SFT_POOL[level], seed + 1, level) for level in LEVELS)
    while True:
        p = rng.choice(easy if rng.random() < EASY_SHARE else hard)
        yield render_prompt(tokenizer, chat.prompt_messages(p, rng)), p.solution


def ranked_groups(tokenizer: PreTrainedTokenizerFast, probs: list[world.Problem], seed: int) -> list[RankedGroup]:
    """The ORM's training data: per problem, the worked answer over one wrong answer of each kind,
    every one a whole conversation rendered with the ORM's own template (as the service renders it)."""
    rng = random.Random(f"tiny-chat/orm/{seed}")
    groups = []
    for p in probs:
        prompt = chat.prompt_messages(p, rng)
        answers = [p.solution, *(chat.wrong_solution(p, kind, rng) for kind in chat.REJECTION_KINDS)]
        texts = [render_exchange(tokenizer, prompt, [chat.answer_message(a)]) for a in answers]
        groups.append(RankedGroup("", texts, best=0, worse=list(range(1, len(texts)))))
    return groups


# --- checks --------------------------------------------------------------------------------------


def pass_rate(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    probs: list[world.Problem],
    temperature: float,
    seed: int,
) -> float:
    """Share of `probs` the policy answers right (`#### n`), one sample each."""
    rng = random.Random(seed)
    prompts = [render_prompt(tokenizer, chat.prompt_messages(p, rng)) for p in probs]
    out = sample(model, tokenizer, prompts, SamplingParams(temperature, max_new_tokens=MAX_NEW_TOKENS), seed=seed)
    return sum(is_correct(p, s[0].text) for p, s in zip(probs, out)) / len(probs)


def pairwise_accuracy(
    model: LlamaForSequenceClassification, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, Any]]
) -> dict[str, float]:
    """Share of rows whose chosen answer the ORM scores above the rejected one, overall and per subset."""
    texts = [render_exchange(tokenizer, r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    scores = score_outcome(model, tokenizer, texts)
    wins: dict[str, list[bool]] = {}
    for r, chosen, rejected in zip(rows, scores[0::2], scores[1::2]):
        wins.setdefault("all", []).append(chosen > rejected)
        wins.setdefault(r["subset"], []).append(chosen > rejected)
    return {k: sum(v) / len(v) for k, v in wins.items()}


# --- the build -----------------------------------------------------------------------------------

Progress = Callable[[str, int, int, float], None]  # (stage, step, total steps, loss)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


RM_SPEC = """\
# The tiny-chat fixture's rewards: `assay rm serve --spec rm.yaml`. Paths are relative to this file.
rewards:
  # the ORM renders the conversation with its OWN tokenizer's chat template, not the policy's
  orm: {type: model.outcome, path: orm, chat_template: true, activation: sigmoid, max_tokens: 512}
  # 1/0: the number after `####` equals the row's reference (prompts.jsonl's `answer` column)
  correct: {type: rule.math_equal, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}
"""


def write_data(out_dir: Path, cfg: TinyChatConfig) -> list[dict[str, Any]]:
    """The data files and rm.yaml; returns the held-out preference rows (the ORM's check)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"tiny-chat/data/{cfg.seed}")
    train, heldout = problems("train", cfg.rows, cfg.seed), problems("heldout", cfg.eval_rows, cfg.seed)
    write_jsonl(out_dir / "prompts.jsonl", prompt_rows(train, rng))
    write_jsonl(out_dir / "eval_prompts.jsonl", prompt_rows(heldout, rng))
    write_jsonl(out_dir / "demonstrations.jsonl", demonstration_rows(train, rng))
    preferences, eval_preferences = preference_rows(train, rng), preference_rows(heldout, rng)
    write_jsonl(out_dir / "preferences.jsonl", preferences)
    write_jsonl(out_dir / "eval_preferences.jsonl", eval_preferences)
    (out_dir / "rm.yaml").write_text(RM_SPEC)
    return eval_preferences


def build(
    out_dir: Path,
    cfg: TinyChatConfig | None = None,
    log: Callable[[str], None] = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write the policy, the ORM and the data files under out_dir; returns what build.json holds."""
    cfg = cfg or TinyChatConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    seconds: dict[str, float] = {}

    def tick(name: str, total: int) -> Callable[[int, float], None] | None:
        return None if progress is None else lambda step, loss: progress(name, step + 1, total, loss)

    def stage(name: str, t0: float) -> None:
        seconds[name] = round(time.perf_counter() - t0, 1)
        log(f"{name}: {seconds[name]:.0f}s")

    t0 = time.perf_counter()
    eval_preferences = write_data(out_dir, cfg)
    text = corpus(problems("train", 512, cfg.seed + 2), random.Random(f"tiny-chat/corpus/{cfg.seed}"))
    policy_tok, orm_tok = policy_tokenizer(text, cfg.policy_vocab), orm_tokenizer(text, cfg.orm_vocab)
    stage("data", t0)

    t0 = time.perf_counter()
    policy = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=len(policy_tok),
            hidden_size=cfg.policy_width,
            intermediate_size=3 * cfg.policy_width,
            num_hidden_layers=cfg.policy_layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # grouped-query attention, as Qwen2 checkpoints have
            max_position_embeddings=policy_tok.model_max_length,
            tie_word_embeddings=True,
            bos_token_id=None,
            eos_token_id=policy_tok.eos_token_id,
            pad_token_id=policy_tok.pad_token_id,
        )
    )
    train_sft(policy, policy_tok, sft_examples(policy_tok, cfg.seed), cfg.policy, tick("policy", cfg.policy.steps))
    policy.generation_config.eos_token_id = policy_tok.eos_token_id
    policy.generation_config.pad_token_id = policy_tok.pad_token_id
    policy.save_pretrained(str(out_dir / "policy"))
    policy_tok.save_pretrained(str(out_dir / "policy"))
    stage("policy", t0)

    t0 = time.perf_counter()
    orm_config = LlamaConfig(
        vocab_size=len(orm_tok),
        hidden_size=cfg.orm_width,
        intermediate_size=3 * cfg.orm_width,
        num_hidden_layers=cfg.orm_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=orm_tok.model_max_length,
        bos_token_id=orm_tok.bos_token_id,
        eos_token_id=orm_tok.eos_token_id,
        pad_token_id=orm_tok.pad_token_id,
    )
    orm_config.num_labels = 1  # one logit: a scalar reward
    orm = LlamaForSequenceClassification(orm_config)
    groups = ranked_groups(orm_tok, problems("train", cfg.orm_problems, cfg.seed + 3), cfg.seed)
    train_outcome_rm(orm, orm_tok, groups, cfg.orm, tick("orm", cfg.orm.steps))
    orm.save_pretrained(str(out_dir / "orm"))
    orm_tok.save_pretrained(str(out_dir / "orm"))
    stage("orm", t0)

    t0 = time.perf_counter()
    check = {level: world.take("heldout", cfg.check_problems, seed=world.EVAL_SEED, level=level) for level in LEVELS}
    figures = {
        **{f"policy_greedy_level{lv}": pass_rate(policy, policy_tok, ps, 0.0, cfg.seed) for lv, ps in check.items()},
        **{f"policy_t1_level{lv}": pass_rate(policy, policy_tok, ps, 1.0, cfg.seed) for lv, ps in check.items()},
        **{f"orm_heldout_accuracy_{k}": v for k, v in pairwise_accuracy(orm, orm_tok, eval_preferences).items()},
    }
    stage("check", t0)
    log(" ".join(f"{k} {v:.2f}" for k, v in figures.items()))
    report = {"seed": cfg.seed, "figures": figures, "seconds": seconds, "config": asdict(cfg)}
    (out_dir / "build.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
