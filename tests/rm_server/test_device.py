"""rm_server on a device and dtype: bf16 scores near float32's, every tensor of a forward on the model's
device, a device this build lacks refused at start, and an out-of-memory batch failing its items only.

No GPU here: the device checks run the backend's device-side functions with the model on `meta`,
where `one_device_per_op` fails any operation that meets a tensor left on the CPU (as CUDA would).
"""

from __future__ import annotations

import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

from assay.checkpoints import ARITH_DIR
from assay.rm_server.backends.hf import TransformersBackend
from assay.rm_server.config import ModelRuntime, ServerConfig
from assay.rm_server.protocol import ErrorType, ScoreResponse
from assay.rm_server.server import BackgroundServer
from tests.helpers import one_device_per_op

pytestmark = pytest.mark.unit

ITEMS = [
    "Q: 23+45-17 A: 23+45=68 68-17=51 #### 51",
    "Q: 23+45-17 A: 23+45=68 68-17=52 #### 52",
    "Q: 12+30 A: 12+30=42 #### 42",
]


def token_ids(backend: TransformersBackend) -> list[list[int]]:
    return [backend.tokenizer(text)["input_ids"] for text in ITEMS]


@pytest.mark.parametrize(("kind", "name"), [("outcome", "orm"), ("process", "prm")])
def test_bf16_scores_are_float32_arrays_near_the_float32_models(kind, name):
    full = TransformersBackend(ARITH_DIR / name, kind)
    half = TransformersBackend(ARITH_DIR / name, kind, dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    batch = token_ids(full)
    for method in ("pooled", "per_token") if kind == "outcome" else ("per_token",):
        want, got = getattr(full, method)(batch), getattr(half, method)(batch)
        assert all(g.dtype == np.float32 and g.shape == w.shape for g, w in zip(got, want, strict=True))
        # bf16 keeps 8 bits of mantissa: logits of a few units move by a few hundredths
        assert max(float(np.abs(g - w).max()) for g, w in zip(got, want, strict=True)) < 0.15
    if kind == "outcome":  # ... and the order of right over wrong survives the rounding
        want, got = full.pooled(batch), half.pooled(batch)
        assert (got[0] > got[1]) == (want[0] > want[1])


@pytest.mark.parametrize(("kind", "name"), [("outcome", "orm"), ("process", "prm")])
def test_every_tensor_of_a_forward_is_on_the_models_device(kind, name):
    backend = TransformersBackend(ARITH_DIR / name, kind, device="meta")
    # sdpa asks whether the mask is all ones (a value meta tensors do not have); eager computes the same
    backend.model.set_attn_implementation("eager")
    batch = [[1, 5, 6, 7], [1, 8]]
    with torch.inference_mode(), one_device_per_op():
        assert backend.pooled_logits(batch).device.type == "meta" if kind == "outcome" else True
        assert backend.token_logits(batch).shape[:2] == (2, 4)
        # the check can fail: ids left on the CPU meet the model's meta weights
        with pytest.raises(AssertionError, match="mixes devices"):
            backend.model(input_ids=torch.ones(2, 4, dtype=torch.long))


@pytest.mark.service
def test_a_device_this_build_lacks_is_refused_at_start_naming_the_reward(tmp_path):
    spec = tmp_path / "rewards.yaml"
    spec.write_text(f"rewards:\n  orm: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, device: cuda}}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "assay.rm_server", "--spec", str(spec), "--port", "0", "--grpc-port", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "reward 'orm': device 'cuda' is not available" in out and "Traceback" not in out


@pytest.mark.service
def test_a_batch_out_of_memory_fails_its_items_overloaded_and_the_service_goes_on(tmp_path):
    spec = tmp_path / "rewards.yaml"
    spec.write_text(f"rewards:\n  orm: {{type: model.outcome, path: {ARITH_DIR / 'orm'}, max_batch_tokens: 512}}\n")
    items = [{"id": f"i{k}", "prompt": "", "response": text} for k, text in enumerate(ITEMS)]
    # The model in this process (no worker), where the test double below can reach its forward;
    # test_workers checks that a worker hands an out-of-memory batch back as the same error.
    config = ServerConfig(spec=spec, port=0, grpc_port=None, models=ModelRuntime(model_workers=False))
    with BackgroundServer(config) as server:
        model = server.service.rewards["orm"].backend.model
        forward = model.forward

        def out_of_memory_once(*args, **kwargs):
            # A test double for what cannot happen here: a GPU running out of memory in one forward.
            model.forward = forward
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        model.forward = out_of_memory_once
        post = lambda: httpx.post(f"{server.http_url}/v1/score", json={"reward": "orm", "items": items}, timeout=60)
        failed = ScoreResponse.model_validate_json(post().content)
        assert [r.score for r in failed.results] == [None] * len(items)
        for r in failed.results:
            assert r.error is not None and r.error.type == ErrorType.overloaded
            assert "out of memory" in r.error.message and "max_batch_tokens (512)" in r.error.message
        again = ScoreResponse.model_validate_json(post().content)
        assert all(r.error is None and r.score is not None for r in again.results)
