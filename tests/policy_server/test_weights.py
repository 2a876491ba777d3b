"""Weight updates on a real server: streamed safetensors and server-side paths, refusals that leave
the old weights serving, and no generation ever served from a half-updated model.

Loading from the server's disk is confined to its --weights-dir: every path it will not read (outside,
escaping by `..` or a symlink, /proc, a FIFO, a directory without weights, missing) gets one and the
same answer, promptly, and the server keeps serving meanwhile."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import save, save_file

from assay.checkpoints import EMBEDDED, load_embedded
from assay.clients import Conflict, InvalidRequest, PermissionDenied, PolicyClient
from assay.policy_server.config import ServerConfig
from assay.policy_server.protocol import ErrorResponse, WeightUpdateResponse
from assay.policy_server.server import BackgroundServer
from assay.policy_server.weight_paths import PathRefused, locate, open_regular
from assay.policy_server.weights import PATH_REFUSED
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = pytest.mark.service

PROMPT = "Q: 23+45-17 A: "


@pytest.fixture(scope="module")
def disk(tmp_path_factory) -> Path:
    """`root`, the server's --weights-dir, and `outside` beside it, which the server must never read."""
    base = tmp_path_factory.mktemp("disk")
    (base / "root").mkdir()
    (base / "outside").mkdir()
    return base


@pytest.fixture(scope="module")
def weights_server(disk):
    """A server of its own: these tests change its weights. Keys, so admin scope is checked."""
    keys = ("admin-key-for-tests:admin,generate", "gen-key-for-tests:generate")
    config = ServerConfig(
        port=0, models={"policy": EMBEDDED["policy"][1]}, api_keys=keys, weights_dirs=(disk / "root",)
    )
    with BackgroundServer(config) as s:
        yield s


@pytest.fixture(scope="module")
def admin(weights_server):
    with PolicyClient.http(weights_server.http_url, api_key="admin-key-for-tests", max_retries=0) as c:
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
        (lambda s: {k: v.to(torch.int32) for k, v in list(s.items())[:1]}, "int32"),  # a float of another width is cast
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
    auth = {"authorization": "Bearer admin-key-for-tests", "content-type": "application/octet-stream"}
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
    with PolicyClient.http(weights_server.http_url, api_key="gen-key-for-tests", max_retries=0) as c:
        with pytest.raises(PermissionDenied):
            c.update_weights({"lm_head.weight": original["lm_head.weight"]})
        with pytest.raises(PermissionDenied):
            c.load_weights("/tmp")


def test_expect_version_refuses_a_stale_update(admin, original):
    version = admin.weight_version()
    with pytest.raises(Conflict, match=f"at weight_version {version}"):
        admin.update_weights(original, expect_version=version - 1)
    assert admin.update_weights(original, expect_version=version).weight_version == version + 1


def _push(weights_server, blob: bytes, route: str = "/v1/admin/weights", **params) -> httpx.Response:
    """One push over HTTP, `params` as the query (the client's multi-replica pushes are the clients' tests)."""
    headers = {"authorization": "Bearer admin-key-for-tests", "content-type": "application/octet-stream"}
    url = f"{weights_server.http_url}{route}"
    return httpx.post(url, params={"model": "policy", **params}, content=blob, headers=headers, timeout=60)


def test_a_target_version_is_the_version_served_and_must_be_above_the_current(weights_server, admin, original):
    text, version = greedy(admin)
    blob = save({"lm_head.weight": original["lm_head.weight"]})
    r = _push(weights_server, blob, version=version + 5)
    assert r.status_code == 200, r.text
    reply = WeightUpdateResponse.model_validate(r.json())
    assert (reply.previous_version, reply.weight_version) == (version, version + 5)
    assert greedy(admin) == (text, version + 5) and admin.weight_version() == version + 5
    # the same version again (a retried push whose answer was lost) and an older one: 409, naming the current
    for target, landed in ((version + 5, True), (version + 1, False)):
        r = _push(weights_server, blob, version=target)
        error = ErrorResponse.model_validate(r.json()).error
        assert (r.status_code, error.code, error.param) == (409, "version_conflict", "version")
        assert f"at weight_version {version + 5}" in error.message
        assert ("a push of this version landed" in error.message) == landed
    # beside expect_version: both must hold
    r = _push(weights_server, blob, version=version + 9, expect_version=version)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "version_mismatch")
    r = _push(weights_server, blob, version=version + 9, expect_version=version + 5)
    assert r.status_code == 200 and r.json()["weight_version"] == version + 9
    # no push makes a version below 1, whatever the current one
    for bad in ("0", "-3", "two"):
        r = _push(weights_server, blob, version=bad)
        assert r.status_code == 400 and "version" in r.json()["error"]["message"], r.text
    assert greedy(admin) == (text, version + 9)


def test_a_load_from_disk_takes_a_target_version(weights_server, admin, original, disk):
    save_file(original, disk / "root" / "target.safetensors")
    text, version = greedy(admin)
    body = {"model": "policy", "path": "target.safetensors", "version": version + 3}
    auth = {"authorization": "Bearer admin-key-for-tests"}
    url = f"{weights_server.http_url}/v1/admin/weights/load"
    r = httpx.post(url, json=body, headers=auth, timeout=60)
    assert r.status_code == 200 and r.json()["weight_version"] == version + 3, r.text
    r = httpx.post(url, json=body, headers=auth, timeout=60)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "version_conflict")
    assert greedy(admin) == (text, version + 3)


def test_load_from_a_path_inside_the_weights_dir(admin, original, disk):
    root = disk / "root"
    text, version = greedy(admin)
    changed = perturbed(original, 0.5, seed=1)
    (root / "ckpt").mkdir()
    save_file(changed, root / "ckpt" / "model.safetensors")
    assert admin.load_weights("ckpt").weight_version == version + 1  # a directory, relative to the root
    changed_text = greedy(admin)[0]
    assert changed_text != text
    save_file(original, root / "original.safetensors")
    assert admin.load_weights("original.safetensors").weight_version == version + 2  # a file
    assert greedy(admin) == (text, version + 2)
    assert admin.load_weights(str(root / "ckpt")).weight_version == version + 3  # absolute, inside the root
    assert greedy(admin) == (changed_text, version + 3)
    # a sharded checkpoint, its files symlinks to blobs without a suffix, as in a Hugging Face cache
    (root / "blobs").mkdir()
    (root / "sharded").mkdir()
    names = list(original)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        save_file({k: original[k] for k in part}, root / "blobs" / f"b{i}")
        (root / "sharded" / f"model-{i}.safetensors").symlink_to(root / "blobs" / f"b{i}")
    reply = admin.load_weights("sharded")
    assert (reply.weight_version, reply.tensors) == (version + 4, len(original))
    assert greedy(admin) == (text, version + 4)


def _refusal(weights_server, path: str) -> tuple[int, dict]:
    r = httpx.post(
        f"{weights_server.http_url}/v1/admin/weights/load",
        json={"model": "policy", "path": path},
        headers={"authorization": "Bearer admin-key-for-tests"},
        timeout=60,
    )
    return r.status_code, r.json()


def test_every_path_the_server_will_not_read_gets_one_answer(weights_server, admin, original, disk):
    """Outside the root, escaping it by `..` or a symlink, /proc, missing, a directory without
    weights, the wrong name: the same 400 for all, so that answers do not tell what exists."""
    root, outside = disk / "root", disk / "outside"
    save_file(original, outside / "model.safetensors")  # good weights, but not where the server may read
    (root / "escape.safetensors").symlink_to(outside / "model.safetensors")
    (root / "escape_dir").symlink_to(outside)
    (root / "environ.safetensors").symlink_to("/proc/self/environ")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not weights")
    (root / "fifo_dir").mkdir()
    os.mkfifo(root / "fifo_dir" / "model.safetensors")
    paths = [
        str(outside / "model.safetensors"),
        str(outside),
        "../outside/model.safetensors",
        "../outside",
        "escape.safetensors",
        "escape_dir",
        "escape_dir/model.safetensors",
        "environ.safetensors",
        "/proc/self/environ",
        "../../../../../../proc/self/environ",
        "/etc/passwd",
        "missing.safetensors",
        "missing",
        "empty",
        "notes.txt",
        "fifo_dir",
        "a\x00b.safetensors",
        "/",
    ]
    text, version = greedy(admin)
    answers = {path: _refusal(weights_server, path) for path in paths}
    expected = (
        400,
        {
            "error": {
                "message": PATH_REFUSED,
                "type": "invalid_request_error",
                "param": "path",
                "code": "weights_path_refused",
            }
        },
    )
    assert {path: answer for path, answer in answers.items() if answer != expected} == {}
    assert "--weights-dir" in PATH_REFUSED
    with pytest.raises(InvalidRequest, match="weights-dir"):
        admin.load_weights("../outside")
    assert greedy(admin) == (text, version)


@pytest.fixture
def served_subprocess(tmp_path):
    """`python -m assay.policy_server --weights-dir ROOT` (keyless loopback), logging to a file: a process of
    its own, so that a server frozen by a read cannot freeze the test that watches it."""
    root, log = tmp_path / "root", tmp_path / "server.log"
    root.mkdir()
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "assay.policy_server",
                "--model",
                str(EMBEDDED["policy"][1]),
                "--port",
                str(port),
                "--weights-dir",
                str(root),
                "--torch-threads",
                "1",
                "--log-level",
                "info",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}")
        yield f"http://127.0.0.1:{port}", root, log
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_a_fifo_neither_blocks_the_request_nor_the_server(served_subprocess):
    """A FIFO named *.safetensors, alone or in a checkpoint directory: opening one to read waits for
    a writer, which once froze the whole server. Refused at once now, /health answers meanwhile, and
    the server's log (not the answer) says why."""
    url, root, log = served_subprocess
    (root / "ckpt").mkdir()
    fifos = [root / "fifo.safetensors", root / "ckpt" / "model.safetensors"]
    for fifo in fifos:
        os.mkfifo(fifo)

    def load(path: str) -> httpx.Response:
        return httpx.post(f"{url}/v1/admin/weights/load", json={"model": "policy", "path": path}, timeout=30)

    with ThreadPoolExecutor(2) as pool:
        try:
            loads = [pool.submit(load, path) for path in ("fifo.safetensors", str(root / "ckpt"))]
            for _ in range(3):  # while the loads are in flight (or stuck), the server answers
                assert httpx.get(f"{url}/health", timeout=10).status_code == 200
            for reply in (future.result(timeout=60) for future in loads):
                assert reply.status_code == 400 and reply.json()["error"]["message"] == PATH_REFUSED, reply.text
        finally:  # had the server opened a FIFO, a writer that comes and goes releases it
            for fifo in fifos:
                try:
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass  # no reader: nothing was blocked on it
    assert log.read_text().count("is not a regular file") == 2


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (lambda s: b"", "too short to be a safetensors file"),
        (lambda s: b"name=value\x00" * 8, "not a safetensors file"),
        (lambda s: struct.pack("<Q", 4) + b"{{{{", "not JSON"),
        (lambda s: save({"lm_head.weight": s["lm_head.weight"]})[:-10], "truncated"),
        (lambda s: save({"lm_head.weight": s["lm_head.weight"]}) + b"xx", "not a safetensors file"),
        (lambda s: save({"no.such.weight": torch.zeros(2)}), "does not have: no.such.weight"),
        (lambda s: save({"lm_head.weight": torch.zeros(3, 3)}), "wrong shape"),
    ],
    ids=["empty", "text", "bad-header", "truncated", "overlong", "unknown-name", "wrong-shape"],
)
def test_a_file_that_is_not_the_model_weights_is_a_400_naming_why(weights_server, admin, original, disk, content, says):
    text, version = greedy(admin)
    (disk / "root" / "bad.safetensors").write_bytes(content(original))
    status, body = _refusal(weights_server, "bad.safetensors")
    assert status == 400 and body["error"]["code"] == "invalid_weights", body
    assert says in body["error"]["message"] and "unchanged" in body["error"]["message"]
    assert greedy(admin) == (text, version)


def test_two_shards_holding_one_tensor_are_refused(weights_server, admin, original, disk):
    (disk / "root" / "twice").mkdir()
    for i in range(2):
        save_file({"lm_head.weight": original["lm_head.weight"]}, disk / "root" / "twice" / f"m{i}.safetensors")
    status, body = _refusal(weights_server, "twice")
    assert status == 400 and "more than one file: lm_head.weight" in body["error"]["message"], body


@pytest.mark.unit
def test_a_file_swapped_after_its_check_is_not_read(tmp_path):
    """Between the check and the open, the file (or a directory on its way) may change: the file
    opened must be the very one that was checked."""
    (tmp_path / "m.safetensors").write_bytes(b"checked")
    (found,) = locate([tmp_path], "m.safetensors")
    (tmp_path / "other").write_bytes(b"swapped in")
    os.replace(tmp_path / "other", tmp_path / "m.safetensors")
    with pytest.raises(PathRefused, match="changed since it was checked"):
        open_regular(found)


def test_loading_from_disk_is_off_without_a_weights_dir(server):
    """The shared server was started without --weights-dir: the route answers 403 and says so."""
    r = httpx.post(f"{server.http_url}/v1/admin/weights/load", json={"model": "policy", "path": "/tmp"}, timeout=30)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "weights_dir_not_configured"
    assert "start the server with --weights-dir" in r.json()["error"]["message"]
    with PolicyClient.http(server.http_url, max_retries=0) as c, pytest.raises(PermissionDenied, match="weights-dir"):
        c.load_weights(str(EMBEDDED["policy"][1]))


@pytest.mark.unit
def test_the_cli_takes_weights_dirs_and_refuses_a_missing_one(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert "--weights-dir" in shown.stdout, shown.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--weights-dir", str(tmp_path / "absent"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--weights-dir" in proc.stderr + proc.stdout, proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr + proc.stdout


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


@pytest.mark.unit
def test_tied_tensors_must_agree():
    """In a model with tied embeddings, the two names are one tensor: two values for it are refused."""
    import asyncio

    from transformers import LlamaConfig, LlamaForCausalLM

    from assay.checkpoints import load_tokenizer
    from assay.policy_server.backends.hf import HFBackend

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    backend = HFBackend("tied", LlamaForCausalLM(config), load_tokenizer(EMBEDDED["policy"][1]))
    emb = backend.model.state_dict()["model.embed_tokens.weight"].clone()
    assert backend.parameter_specs()["lm_head.weight"].shape == tuple(emb.shape)
    with pytest.raises(ValueError, match="one tied tensor"):
        asyncio.run(backend.load_weights({"model.embed_tokens.weight": emb + 1, "lm_head.weight": emb + 2}))
    assert backend.weight_version == 0
    assert asyncio.run(backend.load_weights({"lm_head.weight": emb + 1})) == 1
    assert torch.equal(backend.model.get_input_embeddings().weight, emb + 1)  # both names moved together
