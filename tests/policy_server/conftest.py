"""Fixtures for the policy server: the real server on loopback with the embedded checkpoints."""

from __future__ import annotations

import openai
import pytest

from assay.policy_server.config import ServerConfig
from assay.policy_server.server import BackgroundServer
from tests.helpers import torch_threads


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    # Each served model decodes on its own thread; with torch's default of one intra-op thread per
    # core, the tiny models' threads spin against each other (and against other work on the box).
    # For the whole session here, not a module (tests/conftest.py): the session's server serves them all.
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def server():
    """The policy server as `assay policy serve --grpc-port 0` runs it: `policy` and `verifier`."""
    with BackgroundServer(ServerConfig(port=0, grpc_port=0)) as s:
        yield s


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    """The official client, unchanged; no retries, so a refusal surfaces as its typed exception."""
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def verifier():
    from assay.checkpoints import load_embedded

    return load_embedded("verifier")
