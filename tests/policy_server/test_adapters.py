"""LoRA adapter pushes on a real server: merged into the base weights, versioned, greedy output equal
to the trainer's merged model; refusals (unknown module, wrong shape, wrong rank, missing metadata)
that change nothing; a push replaces the previous adapter, and a full update becomes the new base."""

from __future__ import annotations

import copy
import re

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save

from assay.checkpoints import EMBEDDED, load_embedded
from assay.clients import Conflict, InvalidRequest, PolicyClient
from assay.policy_server.config import ServerConfig
from assay.policy_server.server import BackgroundServer
from assay.trainer import lora

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "
TOKENS = 24


@pytest.fixture(scope="module")
def adapter_server():
    """A server of its own: these tests change its weights."""
    with BackgroundServer(ServerConfig(port=0, models={"policy": EMBEDDED["policy"][1]})) as s:
        yield s


@pytest.fixture(scope="module")
def admin(adapter_server):
    with PolicyClient.http(adapter_server.http_url, max_retries=0, timeout_s=120) as c:
        yield c


def trained_adapter(seed: int, r: int = 4, targets="all-linear"):
    """The embedded policy with a LoRA adapter whose B is random (a fresh adapter's B is zero: no change)."""
    model, _ = load_embedded("policy")
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return wrapped


def greedy_local(model, tok) -> list[int]:
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    out = model.eval().generate(ids, max_new_tokens=TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1] :].tolist()


def greedy_served(client: PolicyClient) -> list[int]:
    choice = client.complete(PROMPT, max_tokens=TOKENS, temperature=0.0, return_token_ids=True).choices[0]
    return choice.token_ids or []


def push(client: PolicyClient, wrapped, **kw):
    tensors, alpha, r, fan_in_fan_out = lora.adapter(wrapped)
    return client.update_adapter(tensors, lora_alpha=alpha, r=r, fan_in_fan_out=fan_in_fan_out, **kw)


def test_a_pushed_adapter_serves_the_trainers_merged_greedy_output_and_replaces_the_last(admin):
    _, tok = load_embedded("policy")
    base_out = greedy_served(admin)
    first, second = trained_adapter(seed=1), trained_adapter(seed=2, targets=["q_proj", "v_proj"])
    version = admin.weight_version()
    reply = push(admin, first, expect_version=version)
    assert reply.weight_version == version + 1
    assert reply.bytes < 0.1 * sum(t.numel() * 4 for t in first.get_base_model().state_dict().values())
    merged_first = copy.deepcopy(first).merge_and_unload()
    assert greedy_served(admin) == greedy_local(merged_first, tok) != base_out
    # the second adapter replaces the first (it adapts fewer layers: those go back to their base)
    push(admin, second, expect_version=version + 1)
    assert greedy_served(admin) == greedy_local(copy.deepcopy(second).merge_and_unload(), tok)
    with pytest.raises(Conflict, match="not the expected"):
        push(admin, first, expect_version=version)


def test_a_full_update_becomes_the_base_adapters_merge_into(admin):
    model, tok = load_embedded("policy")
    with torch.no_grad():  # other full weights: the embedded policy's, perturbed
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.02)
    push(admin, trained_adapter(seed=4))  # an adapter on the old base first: its copy must be dropped
    admin.update_weights(model.state_dict())
    assert greedy_served(admin) == greedy_local(model, tok)
    wrapped = trained_adapter(seed=5)
    push(admin, wrapped)
    with torch.no_grad():  # the same adapter on the new base, merged by peft
        rebased = get_peft_model(model, copy.deepcopy(wrapped.peft_config["default"]))
        rebased.load_state_dict({k: v for k, v in wrapped.state_dict().items() if "lora_" in k}, strict=False)
    assert greedy_served(admin) == greedy_local(rebased.merge_and_unload(), tok)


def factors(r: int = 4) -> dict[str, torch.Tensor]:
    tensors, _, _, _ = lora.adapter(trained_adapter(seed=6, r=r))
    return tensors


def body(tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    return save({k: v.detach().clone() for k, v in tensors.items()}, metadata=meta or None)


QPROJ = "model.layers.0.self_attn.q_proj"
OCTETS = {"content-type": "application/octet-stream"}


@pytest.mark.parametrize(
    ("change", "meta", "message"),
    [
        (lambda t: {**t, "model.layers.9.mlp.up_proj.lora_A.weight": t[QPROJ + ".lora_A.weight"]}, {}, "not .*LoRA"),
        (lambda t: {**t, "model.norm.lora_A.weight": t[QPROJ + ".lora_A.weight"]}, {}, "not .*LoRA"),
        (lambda t: {k: v for k, v in t.items() if k != QPROJ + ".lora_B.weight"}, {}, "lora_A without lora_B"),
        (lambda t: {**t, QPROJ + ".lora_A.weight": torch.zeros(4, 7)}, {}, "the layer needs A"),
        (lambda t: t, {"r": "8"}, r"do not fit \(r = 8\)"),
        (lambda t: t, {"r": None}, "must carry lora_alpha"),
        (lambda t: t, {"lora_alpha": "-1"}, "must carry lora_alpha"),
    ],
)
def test_a_bad_adapter_is_refused_with_a_400_and_changes_nothing(admin, adapter_server, change, meta, message):
    before, version = greedy_served(admin), admin.weight_version()
    metadata = {k: v for k, v in {"lora_alpha": "8", "r": "4", **meta}.items() if v is not None}
    r = httpx.post(
        f"{adapter_server.http_url}/v1/admin/adapter",
        params={"model": "policy"},
        content=body(change(factors()), **metadata),
        headers={"content-type": "application/octet-stream"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_adapter" and re.search(message, error["message"]), error
    assert admin.weight_version() == version and greedy_served(admin) == before


def test_an_adapter_push_takes_a_target_version(admin, adapter_server):
    wrapped = trained_adapter(seed=7)
    version = admin.weight_version()
    tensors, alpha, r, _ = lora.adapter(wrapped)
    url, blob = f"{adapter_server.http_url}/v1/admin/adapter", body(tensors, lora_alpha=str(alpha), r=str(r))

    def post(target: int) -> httpx.Response:
        params = {"model": "policy", "version": target}
        return httpx.post(url, params=params, content=blob, headers=OCTETS, timeout=60)

    reply = post(version + 4)
    assert reply.status_code == 200 and reply.json()["weight_version"] == version + 4, reply.text
    served = greedy_served(admin)
    again = post(version + 4)
    assert (again.status_code, again.json()["error"]["code"]) == (409, "version_conflict")
    assert admin.weight_version() == version + 4
    # the same adapter pushed without a target: merged into the same base, one version on
    assert push(admin, wrapped).weight_version == version + 5 and greedy_served(admin) == served


def test_the_client_refuses_nothing_itself_and_raises_the_servers_400(admin):
    with pytest.raises(InvalidRequest, match="the layer needs A"):
        admin.update_adapter({**factors(), QPROJ + ".lora_A.weight": torch.zeros(4, 7)}, lora_alpha=8, r=4)


def test_a_float32_adapter_merges_into_a_bfloat16_server_in_float32_then_casts():
    config = ServerConfig(port=0, models={"policy": EMBEDDED["policy"][1]}, dtype="bfloat16")
    with (
        BackgroundServer(config) as server,
        PolicyClient.http(server.http_url, max_retries=0, timeout_s=120) as client,
    ):
        served = server.service.backends["policy"].model
        before = {k: v.clone() for k, v in served.state_dict().items()}
        wrapped = trained_adapter(seed=7, targets=["q_proj", "down_proj"])
        push(client, wrapped)
        after = served.state_dict()
        layers = {n: m for n, m in wrapped.get_base_model().named_modules() if hasattr(m, "get_delta_weight")}
        assert len(layers) == 8  # q_proj and down_proj of 4 layers
        for layer, module in layers.items():
            name = layer + ".weight"
            expected = (before[name].float() + module.get_delta_weight("default")).to(torch.bfloat16)
            assert after[name].dtype == torch.bfloat16 and torch.equal(after[name], expected), name
        untouched = [k for k in before if "q_proj" not in k and "down_proj" not in k]
        assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
