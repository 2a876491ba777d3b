"""bench/score_bench.py's mixed-length workload runs end to end at its smallest size (`--smoke`), so it
cannot rot: the model is built, the items are scored in every batch formation in process and through
a served rm_server, and the table comes out with every row and the target line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.service, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[2] / "bench" / "score_bench.py"


def test_the_mixed_workload_smoke_run_prints_every_row():
    cmd = [sys.executable, str(BENCH), "--workload", "mixed", "--smoke", "--torch-threads", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=BENCH.parent.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for row in ("arrival order", "length-sorted", "batcher's rule", "one at a time", "rm_server, one-item HTTP"):
        assert row in out, out
    served = re.search(r"rm_server, one-item HTTP requests #1: (\d+) items/s.*?errors (\d+)", out, re.S)
    assert served is not None and int(served.group(1)) > 0 and served.group(2) == "0", out
    assert re.search(r"target: served mixed >= 0\.80x length-sorted: \d+\.\d\dx, (met|not met)", out), out
