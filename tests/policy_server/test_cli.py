"""`python -m assay.policy_server` as a real subprocess: serves, answers the openai client, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import openai
import pytest

from assay.checkpoints import ARITH_DIR
from assay.proto.policy.v1 import policy_pb2, policy_pb2_grpc
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = pytest.mark.unit


@pytest.mark.service
def test_server_subprocess_serves_the_embedded_models_and_stops_cleanly():
    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "assay.policy_server",
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--torch-threads",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"policy", "verifier"}
        done = client.completions.create(model="policy", prompt="Q: 23+45-17 A: ", max_tokens=40, temperature=0)
        assert done.choices[0].text == "23+45=68 68-17=51 #### 51"
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            reply = stub.Generate(
                policy_pb2.GenerateRequest(model="policy", prompt="Q: 23+45-17 A: ", max_tokens=40, temperature=0.0),
                timeout=30,
            )
        assert reply.choices[0].text == done.choices[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_serving_beyond_loopback_without_keys_exits_with_a_message():
    env = {**os.environ, "ASSAY_POLICY_API_KEYS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--host", "0.0.0.0", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "without API keys" in proc.stderr + proc.stdout


def test_a_missing_checkpoint_exits_with_the_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--model", str(tmp_path / "absent"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "no such checkpoint directory" in proc.stderr + proc.stdout


def test_an_unknown_backend_exits_with_the_choices():
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--backend", "tgi", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "use one of transformers, vllm" in proc.stderr + proc.stdout


@pytest.mark.slow  # a subprocess that loads the checkpoint to refuse it: ~9 s
def test_a_classifier_checkpoint_as_the_model_exits_naming_the_missing_weights():
    orm = ARITH_DIR / "orm"
    proc = subprocess.run(
        [sys.executable, "-m", "assay.policy_server", "--model", str(orm), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "missing weights lm_head.weight" in proc.stderr + proc.stdout
