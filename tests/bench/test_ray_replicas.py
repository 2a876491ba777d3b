"""bench/ray_replicas.py runs end to end at its smallest size (`--smoke`), so it cannot rot: the plain
server and the 1- and 2-replica Serve applications start on a local Ray, every row of both rewards gets
its window of load with no failed request, and the table comes out with its ratios to the plain server."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.xdist_group("ray")]  # one worker: one Ray at a time

BENCH = Path(__file__).resolve().parents[2] / "bench" / "ray_replicas.py"


def test_the_smoke_run_measures_every_row_with_no_error():
    run = subprocess.run(
        [sys.executable, str(BENCH), "--smoke"], capture_output=True, text=True, timeout=600, cwd=BENCH.parent.parent
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for reward in ("orm", "format"):
        for server in ("plain", "Serve, 1 replica", "Serve, 2 replicas"):
            row = re.search(rf"^{reward}\s+{re.escape(server)}\s+(\d+)\s+(\d+\.\d\d)\s", out, re.M)
            assert row is not None, out
            assert int(row.group(1)) > 0, row.group(0)
        assert re.search(rf"^{reward}\s+plain\s+\d+\s+1\.00\s", out, re.M), out  # the baseline's own ratio
    assert "errors 0" in out.splitlines()[-1], out
