"""Shared fixtures: a tiny random Llama for fast unit tests, the embedded checkpoints, one torch
thread; and the tier check (tests/tiers.py). Plain helpers live in tests/helpers.py."""

import os

import pytest
import torch
from transformers import LlamaForCausalLM

from assay.arith.tokenizer import build_tokenizer
from tests.helpers import tiny_llama_config, torch_threads
from tests.tiers import pytest_collection_modifyitems, pytest_runtest_setup  # noqa: F401  (hooks: found by name)

pytest_plugins = ["tests.order"]  # the order test files run in: long ones first (a second modifyitems hook)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def tiny_lm(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_llama_config(tokenizer, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
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


@pytest.fixture(scope="session")
def tiny_chat(tmp_path_factory):
    """The tiny-chat fixture's folder, built once per test run by `assay models tiny-chat --out DIR`: DIR/policy
    (Qwen2, byte-level BPE, ChatML), DIR/orm (another tokenizer and template), DIR/*.jsonl data files, DIR/rm.yaml.

    Under pytest-xdist every worker asks for it; the first builds it in the run's shared temporary folder (the
    parent of the workers' own) under a file lock, and the others wait for it and reuse it.
    """
    from filelock import FileLock
    from typer.testing import CliRunner

    from assay.cli import app

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = root / "tiny-chat"
    with FileLock(str(root / "tiny-chat.lock")):
        if not (out / "build.json").exists():  # written last: its presence means a whole build
            with torch_threads(1):  # tiny models on a shared machine: one thread each is faster
                result = CliRunner().invoke(app, ["models", "tiny-chat", "--out", str(out)])
            assert result.exit_code == 0, f"assay models tiny-chat failed:\n{result.output}\n{result.exception!r}"
    return out


@pytest.fixture(scope="session")
def rules_spec(tmp_path_factory):
    """A reward spec of one rule (`format`: the response ends in `#### n`): a reward server on it starts at
    once, with no model to load, for the tests of what every server does."""
    path = tmp_path_factory.mktemp("spec") / "rules.yaml"
    path.write_text('rewards:\n  format: {type: rule.regex, pattern: "#### -?\\\\d+$"}\n')
    return path
