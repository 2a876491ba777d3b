"""The tiny-chat fixture (`assay models tiny-chat`): real tokenizer and template behaviour, a policy that
answers, an ORM on another tokenizer that orders right over wrong, and data files the loaders read.

One build per session (the `tiny_chat` fixture in tests/conftest.py runs the command itself); the checks read
what it wrote, as a user's code would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from assay.arith import world
from assay.arith.checks import final_answer
from assay.checkpoints import load_model
from assay.generation import SamplingParams, sample
from assay.scoring import score_outcome
from assay.tiny_chat import TinyChatConfig, write_data

pytestmark = [pytest.mark.unit, pytest.mark.slow]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "2+3=5 #### 5"},
]
ODD_TEXTS = [
    "héllo wörld",
    "emoji 🙂👍🏽 and 中文, العربية",
    "tabs\tand\r\nnewlines\n\n",
    "  leading",
    "<|im_end|>?",
    "\x00\x7f",
]


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def expression(messages: list[dict]) -> str:
    """The arithmetic expression a conversation asks about (the user's last turn)."""
    text = messages[-1]["content"]
    return next(tok.strip("?.:") for tok in text.split() if any(c.isdigit() for c in tok))


def test_tokenizers_round_trip_any_utf8(tiny_chat: Path) -> None:
    for name in ("policy", "orm"):
        tok = AutoTokenizer.from_pretrained(tiny_chat / name)
        for text in ODD_TEXTS:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids
            if "<|" not in text:
                assert tok.decode(ids) == text, (name, text)


def test_policy_template_is_chatml_and_stops_at_im_end(tiny_chat: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_chat / "policy")
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
        "<|im_start|>assistant\n2+3=5 #### 5<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt)["input_ids"]
    for special in ("<|im_start|>", "<|im_end|>"):  # one token each, never spelt out in bytes
        assert ids.count(tok.convert_tokens_to_ids(special)) == prompt.count(special)
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nBe brief.")


def test_the_orm_has_its_own_tokenizer_and_template(tiny_chat: Path) -> None:
    policy = AutoTokenizer.from_pretrained(tiny_chat / "policy")
    orm = AutoTokenizer.from_pretrained(tiny_chat / "orm")
    assert policy.get_vocab() != orm.get_vocab()
    assert orm.apply_chat_template(CONVERSATION, tokenize=False) == (
        "<s><|system|>\nBe brief.</s><|user|>\nWhat is 2+3?</s><|assistant|>\n2+3=5 #### 5</s>"
    )
    # the same answer is different tokens: numbers merge in the ORM's vocabulary, digits stay apart in the policy's
    text = "23+45=68 #### 68"
    assert len(orm(text)["input_ids"]) < len(policy(text)["input_ids"])


def test_policy_answers_held_out_prompts_in_the_hash_form(tiny_chat: Path) -> None:
    model, tok = load_model(tiny_chat / "policy", "causal_lm")
    probs = rows(tiny_chat / "eval_prompts.jsonl")
    prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in probs]
    out = sample(model, tok, prompts, SamplingParams(temperature=1.0, max_new_tokens=40), n=2, seed=0)
    texts = [(r, s.text) for r, ss in zip(probs, out) for s in ss]
    answered = [final_answer(t) for _, t in texts]
    right = sum(a is not None and str(a) == r["answer"] for (r, _), a in zip(texts, answered))
    assert sum(s.finish_reason == "stop" for ss in out for s in ss) > 0.8 * len(texts)  # it ends at <|im_end|>
    assert sum(a is not None for a in answered) > 0.8 * len(texts)
    assert right > 0.2 * len(texts), f"{right}/{len(texts)} right"


def test_orm_orders_chosen_over_rejected_on_held_out_rows(tiny_chat: Path) -> None:
    model, tok = load_model(tiny_chat / "orm", "sequence_classification")
    pairs = rows(tiny_chat / "eval_preferences.jsonl")
    texts = [
        tok.apply_chat_template([*r["prompt"], *r[side]], tokenize=False)
        for r in pairs
        for side in ("chosen", "rejected")
    ]
    scores = score_outcome(model, tok, texts)
    wins = [c > r for c, r in zip(scores[0::2], scores[1::2])]
    assert sum(wins) / len(wins) > 0.65


def test_files_load_with_datasets_and_keep_held_out_rows_apart(tiny_chat: Path) -> None:
    from datasets import load_dataset

    def load(name: str):
        return load_dataset("json", data_files=str(tiny_chat / name), split="train")

    prompts, evals = load("prompts.jsonl"), load("eval_prompts.jsonl")
    assert {"prompt", "answer"} <= set(prompts.column_names)
    assert any(m[0]["role"] == "system" for m in prompts["prompt"]) and all(
        m[-1]["role"] == "user" for m in prompts["prompt"]
    )
    prefs = load("preferences.jsonl")
    assert set(prefs.column_names) == {"prompt", "chosen", "rejected", "subset"}
    assert set(prefs["subset"]) == {"slip", "answer", "unfinished"}
    assert all(c[0]["role"] == "assistant" for c in prefs["chosen"])
    demos = load("demonstrations.jsonl")
    assert demos.column_names == ["messages"] and all(m[-1]["role"] == "assistant" for m in demos["messages"])

    train = {expression(m) for m in [*prompts["prompt"], *prefs["prompt"]]}
    train |= {expression(m[:-1]) for m in demos["messages"]}
    held = {expression(m) for m in [*evals["prompt"], *load("eval_preferences.jsonl")["prompt"]]}
    assert all(world.split_of(e) == "train" for e in train)
    assert all(world.split_of(e) == "heldout" for e in held) and not train & held


def test_rm_spec_serves_the_orm_with_its_own_template_and_the_rule(tiny_chat: Path) -> None:
    from assay.clients import RewardClient
    from assay.rm_server.local import LocalTransport

    pairs = [r for r in rows(tiny_chat / "eval_preferences.jsonl") if len(r["prompt"]) == 1][:24]
    items = [
        {"prompt": r["prompt"][0]["content"], "response": r[side][0]["content"], "reference": None}
        for r in pairs
        for side in ("chosen", "rejected")
    ]
    with RewardClient(LocalTransport(tiny_chat / "rm.yaml"), timeout_s=300) as rm:
        orm = rm.score("orm", [{k: v for k, v in it.items() if k != "reference"} for it in items])
        answer = str(final_answer(pairs[0]["chosen"][0]["content"]))
        correct = rm.score(
            "correct", [{"prompt": "q", "response": pairs[0]["chosen"][0]["content"], "reference": answer}]
        )
    scores = [r.score for r in orm.results]
    assert all(s is not None and 0 < s < 1 for s in scores)  # activation: sigmoid
    wins = [c > r for c, r in zip(scores[0::2], scores[1::2])]
    assert sum(wins) / len(wins) > 0.6
    assert correct.results[0].score == 1.0


def test_the_data_files_are_the_same_bytes_for_a_seed(tmp_path: Path) -> None:
    cfg = TinyChatConfig(seed=3)
    write_data(tmp_path / "a", cfg)
    write_data(tmp_path / "b", cfg)
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "prompts.jsonl" in names and "rm.yaml" in names
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    other = tmp_path / "c"
    write_data(other, TinyChatConfig(seed=4))
    assert (other / "prompts.jsonl").read_bytes() != (tmp_path / "a" / "prompts.jsonl").read_bytes()
