"""The policy server on a device and dtype: bf16 greedy output equal to the bf16 model's own greedy
decode, a float32 push into a bf16 model cast and served, every tensor of a decode step on the model's
device, a device this build lacks refused at start, and an out-of-memory batch answered 429.

No GPU here: the device check runs the decode loop's device-side steps (`Steps.start`, a draw,
`Batch.step`, with either KV cache) with the model on `meta`, where `one_device_per_op` fails any
operation that meets a tensor left on the CPU.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from assay.checkpoints import EMBEDDED, load_model
from assay.clients import InvalidRequest, Overloaded, PolicyClient
from assay.policy_server.backends import GenerationRequest
from assay.policy_server.backends.hf import HFBackend, _Job, _next_tokens, _Row
from assay.policy_server.backends.steps import Steps
from assay.policy_server.config import BatchSettings, ServerConfig
from assay.policy_server.server import BackgroundServer
from tests.helpers import one_device_per_op

pytestmark = pytest.mark.service

POLICY = EMBEDDED["policy"][1]
PROMPT = "Q: 23+45-17 A: "


def raw_greedy(model, tokenizer, max_tokens: int = 24) -> list[int]:
    """transformers' own greedy decode: the reference the served output must equal."""
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def served_greedy(client: PolicyClient, max_tokens: int = 24) -> list[int]:
    choice = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0, return_token_ids=True).choices[0]
    return list(choice.token_ids)


@pytest.fixture(scope="module")
def bf16_server():
    config = ServerConfig(port=0, models={"policy": POLICY}, dtype="bfloat16", api_keys=("admin-key-for-tests:admin",))
    with BackgroundServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def admin(bf16_server):
    with PolicyClient.http(bf16_server.http_url, api_key="admin-key-for-tests", max_retries=0) as c:
        yield c


def test_a_bf16_server_decodes_as_the_bf16_model_does_and_takes_float32_pushes(bf16_server, admin):
    model, tokenizer = load_model(POLICY, "causal_lm", dtype="bfloat16")
    backend = bf16_server.service.backends["policy"]
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    assert "in bfloat16 on cpu" in backend.describe_size() and "of KV cache" in backend.describe_size()
    assert served_greedy(admin) == raw_greedy(model, tokenizer)

    # a float32 trainer's push: cast to the served bf16 as it is copied in
    full, _ = load_model(POLICY, "causal_lm")
    g = torch.Generator().manual_seed(0)
    pushed = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in full.state_dict().items()}
    assert all(t.dtype == torch.float32 for t in pushed.values())
    admin.update_weights(pushed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(pushed[name])
    assert next(backend.model.parameters()).dtype == torch.bfloat16
    assert served_greedy(admin) == raw_greedy(model, tokenizer)

    # an integer tensor is no weight of a float parameter: refused, whatever the server's dtype
    name = "lm_head.weight"
    with pytest.raises(InvalidRequest, match="int32"):
        admin.update_weights({name: pushed[name].to(torch.int32)})


def test_a_batch_out_of_memory_is_a_retryable_refusal_and_the_server_goes_on(bf16_server, admin):
    model = bf16_server.service.backends["policy"].model
    forward = model.forward

    def out_of_memory_once(*args, **kwargs):
        # A test double for what cannot happen here: a GPU running out of memory in one forward.
        model.forward = forward
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    model.forward = out_of_memory_once
    with pytest.raises(Overloaded, match="out of memory") as info:
        served_greedy(admin)
    assert "--max-batch-tokens (now 16384)" in str(info.value)
    assert len(served_greedy(admin)) > 0


@pytest.mark.unit
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_every_tensor_of_a_decode_step_is_on_the_models_device(kv_cache):
    model, tokenizer = load_model(POLICY, "causal_lm", device="meta")
    # sdpa asks whether the mask is all ones (a value meta tensors do not have); eager computes the same
    model.set_attn_implementation("eager")
    prompts = [tokenizer(p)["input_ids"] for p in (PROMPT, "Q: 1+2 A: ")]  # unequal: left padding
    # a greedy row and a sampled one (its generator on the host, its draw on the device)
    rows = [
        _Row(_Job(GenerationRequest(p, max_tokens=4, temperature=t, seed=1), None)) for p, t in zip(prompts, (0, 1))
    ]
    with torch.inference_mode(), one_device_per_op():
        state, logits = Steps(model, BatchSettings(kv_cache=kv_cache)).start(prompts, tokenizer.pad_token_id, 4)
        choice, fault = _next_tokens(logits, rows)
        logits = state.step(choice)
        assert logits.device.type == "meta" and logits.dtype == torch.float32 and logits.shape[0] == 2
        assert choice.device.type == "meta" and fault.device.type == "meta"
        # the check can fail: ids left on the CPU meet the model's meta weights
        with pytest.raises(AssertionError, match="mixes devices"):
            model(input_ids=torch.ones(2, 1, dtype=torch.long), past_key_values=state.cache)


@pytest.mark.unit
def test_the_size_line_states_the_kv_cache_the_batch_limit_allows():
    model, tokenizer = load_model(POLICY, "causal_lm")
    line = HFBackend("policy", model, tokenizer).describe_size()
    # 4 layers x 2 (K, V) x 128 wide x 4 bytes = 4 KiB a token; 16384 tokens a batch -> 64 MiB
    assert "KV cache 4.0 KiB/token" in line and "max_batch_tokens 16384 -> up to 64.0 MiB of KV cache" in line


def test_a_device_this_build_lacks_is_refused_at_start():
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--device", "cuda", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "device 'cuda' is not available" in out and "Traceback" not in out


@pytest.mark.unit
@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"dtype": "half"}, "dtype must be one of auto, float32, bfloat16, float16"),
        ({"device": ""}, "device must name a torch device"),
        ({"backend": "vllm", "attn_implementation": "eager"}, "vLLM chooses its own attention"),
    ],
)
def test_device_options_are_checked_by_the_config(fields, says):
    with pytest.raises(ValueError, match=says):
        ServerConfig(**fields)
