"""The sizes both services log and the trainer prints: counted from the model, for any dtype and device."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from assay.model_sizes import human_bytes, is_out_of_memory, kv_cache_bytes_per_token, model_size

pytestmark = pytest.mark.unit

CONFIG = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=True,
)


def test_a_bf16_causal_lm_counts_tied_weights_once_and_its_kv_cache_per_token():
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    # Tied by hand: in one whole-suite run transformers built this model untied after other tests had
    # run in the worker (cause not found); what is tested here is the counting, not transformers' tying.
    model.lm_head.weight = model.model.embed_tokens.weight
    size = model_size(model)
    expected = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    assert size.parameters == expected == size.trainable
    assert size.parameters < sum(t.numel() for t in model.state_dict().values())  # lm_head is embed_tokens
    assert size.dtype == "bfloat16" and size.device == "cpu"
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert size.weight_bytes == 2 * expected + buffers
    # 2 (K, V) x 3 layers x 2 KV heads x 16 head dim x 2 bytes
    assert size.kv_bytes_per_token == 2 * 3 * 2 * 16 * 2 == kv_cache_bytes_per_token(model.config, 2)
    assert "bfloat16 on cpu" in size.describe() and "KV cache 384 B/token" in size.describe()


def test_a_classifier_on_meta_has_sizes_but_no_kv_cache():
    with torch.device("meta"):
        model = LlamaForSequenceClassification(LlamaConfig(**CONFIG, num_labels=1))
    for p in model.model.parameters():  # a frozen backbone: the head alone trains
        p.requires_grad_(False)
    size = model_size(model)
    assert size.device == "meta" and size.kv_bytes_per_token is None
    assert size.trainable == 64 and size.parameters > size.trainable
    assert "(64 trainable)" in size.describe()


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 1536, 3 * 1024**3)] == ["512 B", "1.5 KiB", "3.0 GiB"]


def test_out_of_memory_is_told_from_other_errors():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried ...")
    assert is_out_of_memory(cpu)
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not is_out_of_memory(ValueError("DefaultCPUAllocator: can't allocate memory"))  # not torch's
