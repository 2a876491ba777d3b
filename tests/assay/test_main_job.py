"""`assay run`: both services started on loopback, every strategy searched over HTTP, servers stopped."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from assay.rm_server.spec import load_spec, reward_ids
from assay.services import EMBEDDED_SPEC, spec_for_policy_port

pytestmark = pytest.mark.e2e


def test_assay_run_prints_every_strategy_and_stops_the_servers_cleanly():
    out = subprocess.run(
        [sys.executable, "-m", "assay", "run", "--problems", "3", "--n", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout[out.stdout.index("Inference-time search on 3") :]  # the table, after the progress bars
    for label in (
        "single sample (no search)",
        "majority vote",
        "weighted best-of-N",
        "verifier as judge",
        "beam search",
        "DVTS",
    ):
        row = next((line for line in text.splitlines() if label in line), None)
        assert row is not None, text
        assert re.search(r"\d+\.\d%", row), row  # an accuracy, not an error
    assert "policy_server exit 0, rm_server exit 0" in text


@pytest.mark.unit
def test_the_spec_copy_moves_only_the_judge(tmp_path: Path):
    copy = spec_for_policy_port(8123, tmp_path)
    raw = yaml.safe_load(copy.read_text())
    assert raw["rewards"]["judge"]["endpoint"] == "http://127.0.0.1:8123/v1"
    assert Path(raw["rewards"]["orm"]["path"]).is_absolute()
    original, moved = reward_ids(load_spec(EMBEDDED_SPEC)), reward_ids(load_spec(copy))
    assert {k: v for k, v in moved.items() if k not in ("judge", "final")} == {
        k: v for k, v in original.items() if k not in ("judge", "final")
    }
