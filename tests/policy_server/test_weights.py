"""Weight updates on a real server: streamed safetensors and server-side paths, refusals that leave
the old weights serving, and no generation ever served from a half-updated model."""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from safetensors.torch import save, save_file

from assay.checkpoints import EMBEDDED, load_embedded
from clients import Conflict, InvalidRequest, PermissionDenied, PolicyClient
from policy_server.server import BackgroundServer, ServerConfig

PROMPT = "Q: 23+45-17 A: "


@pytest.fixture(scope="module")
def weights_server():
    """A server of its own: these tests change its weights. Keys, so admin scope is checked."""
    keys = ("admin-key:admin,generate", "gen-key:generate")
    with BackgroundServer(ServerConfig(port=0, models={"policy": EMBEDDED["policy"][1]}, api_keys=keys)) as s:
        yield s


@pytest.fixture(scope="module")
def admin(weights_server):
    with PolicyClient.http(weights_server.http_url, api_key="admin-key", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def original():
    model, _ = load_embedded("policy")
    return {k: v.clone() for k, v in model.state_dict().items()}


def perturbed(state: dict[str, torch.Tensor], scale: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def greedy(client: PolicyClient, max_tokens: int = 24) -> tuple[str, int]:
    choice = client.complete(PROMPT, max_tokens=max_tokens, temperature=0.0).choices[0]
    return choice.text, choice.weight_version


def test_update_changes_outputs_and_bumps_version_and_restores(admin, original):
    before_text, v0 = greedy(admin)
    reply = admin.update_weights(perturbed(original, 0.5))
    assert (reply.previous_version, reply.weight_version) == (v0, v0 + 1)
    assert reply.tensors == len(original)
    assert reply.bytes > 0 and reply.seconds > 0
    changed_text, v1 = greedy(admin)
    assert v1 == v0 + 1 and admin.weight_version() == v1
    assert changed_text != before_text
    admin.update_weights(original)  # the same weights back: the same outputs, a new version
    assert greedy(admin) == (before_text, v0 + 2)


def test_a_named_subset_updates_only_those_tensors(admin, original):
    text, version = greedy(admin)
    reply = admin.update_weights({"lm_head.weight": torch.zeros_like(original["lm_head.weight"])})
    assert reply.tensors == 1
    zeroed = admin.complete(PROMPT, max_tokens=4, temperature=0.0, return_token_ids=True).choices[0]
    assert zeroed.token_ids == [0, 0, 0, 0]  # all-zero logits: argmax is token 0 at every step
    admin.update_weights({"lm_head.weight": original["lm_head.weight"]})
    assert greedy(admin) == (text, version + 2)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda s: {"no.such.weight": torch.zeros(3)}, "does not have: no.such.weight"),
        (lambda s: {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in list(s.items())[:1]}, "wrong shape"),
        (lambda s: {k: v.double() for k, v in list(s.items())[:1]}, "float64"),
    ],
    ids=["unknown-name", "wrong-shape", "wrong-dtype"],
)
def test_refused_updates_name_the_problem_and_keep_the_old_weights(admin, original, change, says):
    text, version = greedy(admin)
    with pytest.raises(InvalidRequest, match=says) as info:
        admin.update_weights(change(original))
    assert info.value.status == 400 and "unchanged" in str(info.value)
    assert greedy(admin) == (text, version)


def test_malformed_bodies_are_refused(weights_server, admin, original):
    text, version = greedy(admin)
    blob = save({"lm_head.weight": original["lm_head.weight"]})
    url = f"{weights_server.http_url}/v1/admin/weights?model=policy"
    auth = {"authorization": "Bearer admin-key"}
    cases = {
        "body ended inside the tensor data": blob[:-10],
        "goes on after": blob + b"xx",
        "not JSON": struct.pack("<Q", 4) + b"{{{{",
        "body ended inside the header length": b"abc",
    }
    for says, body in cases.items():
        r = httpx.post(url, content=body, headers=auth, timeout=30)
        assert r.status_code == 400 and says in r.json()["error"]["message"], (says, r.text)
    r = httpx.post(url.replace("policy", "nope"), content=blob, headers=auth, timeout=30)
    assert r.status_code == 404
    assert greedy(admin) == (text, version)


def test_weights_need_the_admin_scope(weights_server, original):
    with PolicyClient.http(weights_server.http_url, api_key="gen-key", max_retries=0) as c:
        with pytest.raises(PermissionDenied):
            c.update_weights({"lm_head.weight": original["lm_head.weight"]})
        with pytest.raises(PermissionDenied):
            c.load_weights("/tmp")


def test_expect_version_refuses_a_stale_update(admin, original):
    version = admin.weight_version()
    with pytest.raises(Conflict, match=f"at weight_version {version}"):
        admin.update_weights(original, expect_version=version - 1)
    assert admin.update_weights(original, expect_version=version).weight_version == version + 1


def test_load_from_a_path_on_the_server(admin, original, tmp_path):
    text, version = greedy(admin)
    changed = perturbed(original, 0.5, seed=1)
    save_file(changed, tmp_path / "model.safetensors")
    reply = admin.load_weights(str(tmp_path))
    assert reply.weight_version == version + 1
    assert greedy(admin)[0] != text
    reply = admin.load_weights(str(EMBEDDED["policy"][1]))  # the shipped checkpoint directory
    assert greedy(admin) == (text, version + 2)
    with pytest.raises(InvalidRequest, match="does not exist"):
        admin.load_weights(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    save_file({"no.such.weight": torch.zeros(2)}, tmp_path / "bad" / "x.safetensors")
    with pytest.raises(InvalidRequest, match="does not have: no.such.weight"):
        admin.load_weights(str(tmp_path / "bad"))
    assert greedy(admin) == (text, version + 2)


def test_no_generation_is_served_from_a_half_updated_model(admin, original):
    """Two weight sets, swapped back and forth under concurrent greedy load: every reply must be
    exactly what its reported version's weights produce, never a blend of the two."""
    other = perturbed(original, 0.3, seed=2)
    by_parity = {}
    start = admin.weight_version()
    by_parity[start % 2] = greedy(admin)[0]
    admin.update_weights(other)
    by_parity[(start + 1) % 2] = greedy(admin)[0]
    assert by_parity[0] != by_parity[1]

    stop = threading.Event()
    seen: list[tuple[str, int]] = []

    def load() -> None:
        while not stop.is_set():
            reply = admin.complete([PROMPT] * 4, max_tokens=24, temperature=0.0)
            seen.extend((c.text, c.weight_version) for c in reply.choices)

    with ThreadPoolExecutor(3) as pool:
        workers = [pool.submit(load) for _ in range(3)]
        for i in range(10):
            admin.update_weights(original if i % 2 == 0 else other)
        stop.set()
        for w in workers:
            w.result()
    versions = {v for _, v in seen}
    assert len(versions) >= 3, versions  # the load really straddled several updates
    assert all(text == by_parity[v % 2] for text, v in seen)
    if admin.weight_version() % 2 != start % 2:
        admin.update_weights(original)


def test_tied_tensors_must_agree():
    """In a model with tied embeddings, the two names are one tensor: two values for it are refused."""
    import asyncio

    from transformers import LlamaConfig, LlamaForCausalLM

    from assay.checkpoints import load_tokenizer
    from policy_server.backends.hf import HFBackend

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    backend = HFBackend("tied", LlamaForCausalLM(config), load_tokenizer(EMBEDDED["policy"][1]))
    emb = backend.model.state_dict()["model.embed_tokens.weight"].clone()
    assert backend.parameter_specs()["lm_head.weight"].shape == tuple(emb.shape)
    with pytest.raises(ValueError, match="one tied tensor"):
        asyncio.run(backend.load_weights({"model.embed_tokens.weight": emb + 1, "lm_head.weight": emb + 2}))
    assert backend.weight_version == 0
    assert asyncio.run(backend.load_weights({"lm_head.weight": emb + 1})) == 1
    assert torch.equal(backend.model.get_input_embeddings().weight, emb + 1)  # both names moved together
