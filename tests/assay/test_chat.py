"""assay.chat: conversations rendered with each model's own template; plain text left alone."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from assay.arith.tokenizer import build_tokenizer
from assay.chat import (
    DroppedMessages,
    NoChatTemplate,
    render_chat,
    render_exchange,
    render_prompt,
    split_exchange,
)

pytestmark = pytest.mark.unit

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
OTHER = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]


def tokenizer(template: str | None) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = template
    return fast


def test_plain_text_is_used_as_it_is():
    tok = tokenizer(None)
    assert render_prompt(tok, "Q: 1+1 A:") == "Q: 1+1 A:"
    assert render_exchange(tok, "Q: 1+1 A:", " 2") == "Q: 1+1 A: 2"
    assert split_exchange(tok, "Q: 1+1 A:", " 2") == ("Q: 1+1 A:", " 2")


def test_each_tokenizer_renders_with_its_own_template():
    chatml, other = tokenizer(CHATML), tokenizer(OTHER)
    assert render_prompt(chatml, CHAT) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render_exchange(other, CHAT, "4") == "<|system|>Be brief.<|user|>2+2?<|assistant|>4"
    head, tail = split_exchange(chatml, CHAT, "4")
    assert head == render_prompt(chatml, CHAT) and tail == "4<|im_end|>\n"


def test_a_string_prompt_with_a_message_response_is_one_user_turn():
    assert (
        render_exchange(tokenizer(OTHER), "2+2?", [{"role": "assistant", "content": "4"}])
        == "<|user|>2+2?<|assistant|>4"
    )


def test_a_conversation_for_a_tokenizer_without_a_template_is_refused():
    with pytest.raises(NoChatTemplate, match="has no chat template"):
        render_prompt(tokenizer(None), CHAT)


# --- render_chat: an OpenAI chat request's messages, none dropped ---------------------------------


def test_a_template_with_a_system_turn_renders_it_there():
    assert render_chat(tokenizer(CHATML), CHAT) == render_prompt(tokenizer(CHATML), CHAT)


def test_system_messages_a_template_drops_are_folded_into_the_first_user_turn():
    arith = build_tokenizer()  # the embedded template: user and assistant turns only, `Q: ... A: `
    chat = [*CHAT, {"role": "assistant", "content": "4"}, {"role": "developer", "content": "Then stop."}]
    chat.append({"role": "user", "content": "3+3?"})
    assert render_chat(arith, chat) == "<s>Q: Be brief.\n\nThen stop.\n\n2+2? A: 4</s>Q: 3+3? A: "
    with pytest.raises(DroppedMessages, match="no user turn"):
        render_chat(arith, [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "4"}])


def test_other_roles_a_template_drops_are_refused_by_name():
    with pytest.raises(DroppedMessages, match="'tool'"):
        render_chat(build_tokenizer(), [*CHAT, {"role": "tool", "content": "4"}])


def test_template_kwargs_reach_the_template_but_not_the_renderers_own_parameters():
    thinking = build_tokenizer()
    thinking.chat_template = "{% if enable_thinking %}<think>{% endif %}{{ messages[0]['content'] + eos_token }}"
    assert render_chat(thinking, CHAT[1:], template_kwargs={"enable_thinking": True}) == "<think>2+2?</s>"
    ignored = {"tokenize": True, "eos_token": 1, "add_generation_prompt": False}  # would break or redirect it
    assert render_chat(thinking, CHAT[1:], template_kwargs=ignored) == "2+2?</s>"


def test_continue_final_message_leaves_the_assistants_turn_open():
    arith = build_tokenizer()
    chat = [CHAT[1], {"role": "assistant", "content": "2+2=4 "}]
    text = render_chat(arith, chat, add_generation_prompt=False, continue_final_message=True)
    assert text == "<s>Q: 2+2? A: 2+2=4 "  # no </s> after it
