"""Devices a process can use, said in one sentence before any weights are read; the vLLM build decides
where vLLM runs. This machine's torch is a CPU build: cuda is the device it lacks."""

from __future__ import annotations

import pytest
import torch

from assay.checkpoints import EMBEDDED, check_device, load_model, vllm_on_cpu

pytestmark = pytest.mark.unit

needs_cpu_build = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusals of a machine without CUDA")


def test_the_cpu_and_meta_are_usable_devices():
    assert check_device("cpu") == torch.device("cpu") and check_device("meta").type == "meta"
    assert vllm_on_cpu("cpu") is not torch.cuda.is_available()


@needs_cpu_build
@pytest.mark.parametrize(
    ("device", "says"),
    [
        ("cuda", "device 'cuda' is not available: this torch build has no CUDA"),
        ("cuda:1", "device 'cuda:1' is not available"),
        ("gpu", "device 'gpu' is not a torch device"),
        ("xla", "device 'xla' is not supported here"),
    ],
)
def test_a_device_this_process_cannot_use_is_one_sentence(device, says):
    with pytest.raises(ValueError, match=says):
        check_device(device)
    with pytest.raises(ValueError, match=says):  # before the checkpoint is read: the path is not even looked at
        load_model("/no/such/checkpoint", "causal_lm", device=device)


@needs_cpu_build
def test_vllm_runs_where_its_build_does():
    with pytest.raises(ValueError, match="not available"):
        vllm_on_cpu("cuda")
    with pytest.raises(ValueError, match="the installed vLLM runs on cpu"):
        vllm_on_cpu("meta")


def test_the_attention_implementation_reaches_the_model():
    model, _ = load_model(EMBEDDED["policy"][1], "causal_lm", dtype="bfloat16", attn_implementation="eager")
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16
