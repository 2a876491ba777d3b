"""Test helpers for servers run as real subprocesses on loopback."""

from __future__ import annotations

import subprocess
import time

import httpx

from assay.services import free_port  # noqa: F401  (re-exported: the tests' one way to pick a port)


def wait_ready(proc: subprocess.Popen, url: str, timeout_s: float) -> None:
    """Poll `url`/ready until it answers 200; fail with the process's output if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "server exited"
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not become ready"
        time.sleep(0.2)
