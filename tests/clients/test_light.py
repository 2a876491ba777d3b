"""The clients are the light install: importing and using them loads no torch, transformers or fastapi.

A fresh interpreter (this test's process has torch loaded already) imports the clients, both
transports and the wire types, builds every client and probes a closed port with each (which
loads what the calls load lazily: the generated gRPC code, the health stubs), then reports
`sys.modules`. Of Assay's own modules only the clients, the services' wire types,
`assay.proto` and `assay.answers` may be among them (the layer map's rules for `assay.clients`
and the wire types).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

# Packages of the extras (serve, train), none of them in the base install. (Not rich, click or
# grpc_reflection: httpx and grpc import those for their extras when they happen to be installed.)
NOT_LIGHT = {
    *("torch", "transformers", "tokenizers", "numpy", "vllm", "matplotlib"),
    *("fastapi", "starlette", "uvicorn", "yaml", "prometheus_client", "math_verify", "pebble", "jsonschema"),
}
# What the clients may import of ours: themselves, the services' wire types, the gRPC contracts
# (and the packages that hold them, whose __init__ runs first), and what the wire types stand on
# (assay.answers: /v1/search's `answer`; the standard library only).
ALLOWED = (
    "assay.clients",
    "assay.proto",
    "assay.rm_server.protocol",
    "assay.rm_server.grpc_convert",
    "assay.policy_server.protocol",
    "assay.answers",
)
PACKAGES = {"assay", "assay.rm_server", "assay.policy_server"}

USE_THE_CLIENTS = """
import asyncio, json, sys

import assay.clients
from assay.clients import AsyncRewardClient, PolicyClient, RewardClient
from assay.clients.reward_transport import AsyncGrpc, AsyncHttp, Grpc, Http
from assay.policy_server.protocol import CompletionRequest
from assay.rm_server.grpc_convert import score_request_to_proto
from assay.rm_server.protocol import ScoreRequest

http, target = sys.argv[1], sys.argv[2]
with RewardClient.http(http, timeout_s=1) as c, RewardClient.grpc(target, timeout_s=1) as g:
    assert not c.health() and not g.ready()
with PolicyClient.http(http, timeout_s=1) as p:
    assert not p.health(timeout_s=1)


async def use_async():
    async with AsyncRewardClient.http(http, timeout_s=1) as c, AsyncRewardClient.grpc(target, timeout_s=1) as g:
        assert not await c.health() and not await g.ready()


asyncio.run(use_async())
print(json.dumps(sorted(sys.modules)))
"""


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed on exit: connecting is refused


def test_the_clients_load_no_heavy_module_and_none_of_the_services_but_their_wire_types():
    port = closed_port()
    addresses = [f"http://127.0.0.1:{port}", f"127.0.0.1:{port}"]
    out = subprocess.run(
        [sys.executable, "-c", USE_THE_CLIENTS, *addresses], capture_output=True, text=True, timeout=120, check=True
    )
    modules = json.loads(out.stdout.splitlines()[-1])
    assert "assay.clients.reward_transport" in modules and "assay.proto.reward.v1.reward_pb2_grpc" in modules
    assert sorted({m.split(".")[0] for m in modules} & NOT_LIGHT) == []
    ours = [m for m in modules if m == "assay" or m.startswith("assay.")]
    assert [m for m in ours if m not in PACKAGES and not m.startswith(ALLOWED)] == []


# The light install has no typer: a finder that refuses it stands in for that environment here.
WITHOUT_TYPER = """
import sys
class NoTyper:
    def find_spec(self, name, path=None, target=None):
        if name == "typer" or name.startswith("typer."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTyper())
from assay.__main__ import main
main()
"""


def test_the_assay_command_on_the_light_install_says_what_to_install():
    out = subprocess.run([sys.executable, "-c", WITHOUT_TYPER], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "pip install 'assay[serve]'" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
