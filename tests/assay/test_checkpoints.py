import json
import re

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from assay.checkpoints import EMBEDDED, CheckpointError, load_embedded, load_model

pytestmark = pytest.mark.unit

AUTO = {
    "causal_lm": AutoModelForCausalLM,
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
}


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_checkpoints_load_with_plain_transformers(name):
    kind, path = EMBEDDED[name]
    model = AUTO[kind].from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    assert model.config.model_type == "llama"
    assert len(tok) <= model.config.vocab_size
    assert (path / "model.safetensors").stat().st_size < 8 * 2**20  # "a few MB"
    enc = tok(["Q: 23+45-17 A: 23+45=68 68-17=51 #### 51"], return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).logits
    assert torch.isfinite(out).all()
    if kind == "sequence_classification":
        assert out.shape == (1, 1)
    if kind == "token_classification":
        assert out.shape == (1, enc["input_ids"].shape[1], 1)


def test_missing_path_is_one_clear_sentence(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory") as e:
        load_model(tmp_path / "nope", "causal_lm")
    assert str(tmp_path / "nope") in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_or_a_dir_without_config_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a file"):
        load_model(f, "causal_lm")
    with pytest.raises(CheckpointError, match=re.escape("config.json is missing")):
        load_model(tmp_path, "causal_lm")


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="'vit' is not supported as a causal lm"):
        load_model(tmp_path, "causal_lm")


def test_missing_weights_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no safetensors weights"):
        load_model(tmp_path, "causal_lm")


def test_mismatched_tokenizer_is_refused(tmp_path, tiny_lm, tokenizer):
    tiny_lm.config.vocab_size = 50  # smaller than the 100-token tokenizer
    tiny_lm.resize_token_embeddings(50)
    tiny_lm.save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="tokenizer does not match"):
        load_model(tmp_path, "causal_lm")


def test_broken_tokenizer_is_named(tmp_path, tiny_lm):
    tiny_lm.save_pretrained(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(CheckpointError, match="tokenizer could not be loaded"):
        load_model(tmp_path, "causal_lm")


def test_unknown_embedded_name():
    with pytest.raises(CheckpointError, match="no embedded checkpoint named 'critic'"):
        load_embedded("critic")


def test_a_classifier_checkpoint_is_no_causal_lm():
    """The ORM has a score head and no LM head: loaded as a causal LM, transformers would initialise
    lm_head at random, and the server would answer with garbage."""
    with pytest.raises(CheckpointError, match=r"missing weights lm_head\.weight.*LlamaForSequenceClassification"):
        load_model(EMBEDDED["orm"][1], "causal_lm")


def test_tied_weights_stored_once_are_not_missing(tmp_path, tiny_lm, tokenizer):
    tiny_lm.config.tie_word_embeddings = True
    tiny_lm.tie_weights()
    tiny_lm.save_pretrained(str(tmp_path))  # stores embed_tokens, not lm_head
    tokenizer.save_pretrained(str(tmp_path))
    model, _ = load_model(tmp_path, "causal_lm")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_embedded_checkpoints_are_complete(name):
    load_embedded(name)  # nothing missing, the verifier included


def test_loads_on_threads_take_turns(monkeypatch):
    """transformers' from_pretrained patches `PreTrainedModel.tie_weights` for the length of a load and restores
    what it saw on entry: two loads interleaved on threads can leave tying off in the process for good (a tied
    checkpoint then loads with its LM head missing). So no two of our loads overlap."""
    import threading
    import time

    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    inside, most, lock = [0], [0], threading.Lock()

    def counted(cls, *args, **kwargs):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)  # a load's window, long enough for another thread to enter it if it may
            return real(cls, *args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    kind, path = EMBEDDED["policy"]
    threads = [threading.Thread(target=load_model, args=(path, kind)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert most[0] == 1
