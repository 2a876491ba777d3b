"""Shared fixtures: a tiny random Llama for fast unit tests, the embedded checkpoints, one torch
thread; and the tier check (tests/tiers.py). Plain helpers live in tests/helpers.py."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from assay.arith.tokenizer import build_tokenizer
from tests.helpers import torch_threads
from tests.tiers import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401  (hooks: found by name)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_lm(tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def policy():
    from assay.checkpoints import load_embedded

    return load_embedded("policy")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread while a module runs, then torch's default again. Tiny models on many small
    calls run faster on one thread, and far faster on a busy machine: with torch's default of one
    thread per core, each served model's threads spin against each other and everything else."""
    with torch_threads(1):
        yield
