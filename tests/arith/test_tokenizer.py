import pytest
from transformers import AutoTokenizer

from assay.arith.tokenizer import BOS, EOS, build_tokenizer

pytestmark = pytest.mark.unit


def test_one_token_per_character_with_bos_and_exact_round_trip(tmp_path):
    build_tokenizer().save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))  # loads like any HF checkpoint's tokenizer
    text = "Q: 23+45-17 A: 23+45=68 68-17=51 #### 51"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tmp_path / "tokenizer.json").is_file()


def test_unknown_characters_become_unk_and_specials_are_atomic():
    tok = build_tokenizer()
    ids = tok("7\u00e9", add_special_tokens=False)["input_ids"]
    assert ids[1] == tok.unk_token_id
    assert tok(EOS, add_special_tokens=False)["input_ids"] == [tok.eos_token_id]
    assert tok.convert_ids_to_tokens(tok.bos_token_id) == BOS


def test_chat_template_renders_the_world_prompt():
    tok = build_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "23+45"}], tokenize=False)
    assert text == "<s>Q: 23+45 A: "
    text = tok.apply_chat_template(
        [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "1+2=3 #### 3"}],
        tokenize=False,
    )
    assert text == "<s>Q: 1+2 A: 1+2=3 #### 3</s>"
