"""bench/gpu_check.py's CPU run: the same script a GPU lease runs, on tiny random models, so what a
short lease would spend its minutes on (both services, the benches, a GRPO step with LoRA) is known
to work before one is at hand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    ("rm_server", "uniform: ceiling in-process"),
    ("rm_server", "uniform: ceiling TFLOP/s"),
    ("rm_server", "uniform: served (HTTP)"),
    ("policy_server", "raw model.generate"),
    ("policy_server", "HFBackend, dynamic cache"),
    ("policy_server", "HFBackend, static cache"),
    ("policy_server", "served (HTTP /v1/completions)"),
    ("trainer", "GRPO step, LoRA"),
    ("trainer", "peak memory"),
}


def test_the_gpu_check_runs_on_the_cpu_and_writes_one_table(tmp_path):
    out = tmp_path / "gpu.md"
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = out.read_text()
    assert text.startswith("# GPU check\n") and "CPU" in text and "float32" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    got = {(r[0].removeprefix("| "), r[1]): r[2] for r in rows}
    assert set(got) >= ROWS, sorted(got)
    for key in ROWS:
        assert float(got[key]) > 0, (key, got[key])  # a measured figure, not "failed"
