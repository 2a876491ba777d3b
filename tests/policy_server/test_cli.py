"""`python -m policy_server` as a real subprocess: serves, answers the openai client, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_subprocess_serves_the_embedded_models_and_stops_cleanly():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "policy_server", "--port", str(port), "--torch-threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"policy", "verifier"}
        done = client.completions.create(model="policy", prompt="Q: 23+45-17 A: ", max_tokens=40, temperature=0)
        assert done.choices[0].text == "23+45=68 68-17=51 #### 51"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_serving_beyond_loopback_without_keys_exits_with_a_message():
    env = {**os.environ, "ASSAY_POLICY_API_KEYS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "policy_server", "--host", "0.0.0.0", "--port", str(_free_port())],
        capture_output=True, text=True, timeout=60, env=env,
    )
    assert proc.returncode == 2
    assert "without API keys" in proc.stderr + proc.stdout


def test_a_missing_checkpoint_exits_with_the_reason(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "policy_server", "--model", str(tmp_path / "absent"), "--port", str(_free_port())],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "no such checkpoint directory" in proc.stderr + proc.stdout
