"""The command line: `python -m assay.rm_server` as a real subprocess, and `assay rm probe`."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

from assay.rm_server.probe import PERTURBATIONS, run_probe
from assay.rm_server.protocol import ScoreResponse
from assay.rm_server.rewards import build_rewards
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import parse_spec
from assay.services import free_port
from tests.helpers import wait_ready

pytestmark = pytest.mark.unit


@pytest.mark.service
def test_server_subprocess_serves_the_embedded_rewards_and_stops_cleanly():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "assay.rm_server", "--port", str(port), "--grpc-port", "none", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(proc, url)
        item = {"id": "a", "prompt": "Q: 23+45-17 A: ", "response": "23+45=68 68-17=51 #### 51", "reference": "51"}
        r = httpx.post(f"{url}/v1/score", json={"reward": "final", "items": [item]}, timeout=30)
        res = ScoreResponse.model_validate_json(r.content).results[0]
        assert res.error is None and 0.8 < res.score <= 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Traceback" not in out


def test_serving_beyond_loopback_without_keys_exits_with_a_message():
    env = {**os.environ, "ASSAY_API_KEYS": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "assay.rm_server",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--grpc-port",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert proc.returncode == 2
    assert "without API keys" in proc.stderr + proc.stdout


def test_a_bad_spec_exits_with_the_reason(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("rewards:\n  x: {type: rule.regex}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "assay.rm_server", "--spec", str(spec), "--port", "0", "--grpc-port", "none"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "pattern" in proc.stderr + proc.stdout


SPEC = {
    "rewards": {
        "format": {"type": "rule.regex", "pattern": "^(-?\\d+[+-]\\d+=-?\\d+ )*#### -?\\d+$", "mode": "fullmatch"},
        "loose": {"type": "rule.exact_match", "answer_pattern": "####\\s*(-?\\d+)"},
        "long": {"type": "rule.length_penalty", "max_length": 60, "buffer": 10},
    }
}


def test_probe_reports_which_rewards_presentation_moves():
    async def go():
        service = RewardService(build_rewards(parse_spec(SPEC)))
        await service.start()
        try:
            return await run_probe(service, ["format", "loose", "long"], problems=8)
        finally:
            await service.close()

    table = asyncio.run(go())
    assert set(table["format"]) == set(PERTURBATIONS)
    # a strict format rule fails every perturbed solution, right or wrong (both are well formed)
    assert table["format"]["exclamation"].mean_delta == pytest.approx(-1.0)
    # an unanchored answer check ignores an opener and a trailing link
    assert table["loose"]["affirmative opener"].mean_delta == 0.0
    assert table["loose"]["link"].mean_delta == 0.0
    # padding past max_length costs the length rule, an emoji (3 characters) does not
    assert table["long"]["length padding"].mean_delta < 0 and table["long"]["emoji"].mean_delta == 0.0
    assert all(c.scored == 16 and c.failed == 0 for row in table.values() for c in row.values())


def test_probe_command_prints_a_table(tmp_path):
    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    proc = subprocess.run(
        [sys.executable, "-m", "assay", "rm", "probe", "--spec", str(spec), "--problems", "4"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for word in ("length padding", "affirmative opener", "format", "loose", "sha256:"):
        assert word in proc.stdout
