"""assay.chat: conversations rendered with each model's own template; plain text left alone."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from assay.chat import NoChatTemplate, render_exchange, render_prompt, split_exchange

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
