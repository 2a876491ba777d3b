"""Both services on this machine's loopback, as subprocesses: what `assay run`, the benches and the
trainer's end-to-end runs stand on.

    with LocalServices.start() as svc:
        svc.rm_url, svc.policy_url      # http://127.0.0.1:<free port> each
    with LocalServices.start(rm_grpc=True) as svc:
        svc.rm.grpc_target              # 127.0.0.1:<free port>: rm_server's gRPC API too

Each service runs exactly as a user starts it (`python -m assay.rm_server`, `python -m assay.policy_server`,
which are `assay rm serve` and `assay policy serve`), on free ports. The embedded reward spec's judge asks the
policy server on :8001; when the policy server runs elsewhere, rm_server gets a copy of the spec whose judge
points at the right port (checkpoint paths made absolute, nothing else changed, so every reward id is
the embedded one). Leaving the block sends SIGTERM and waits: a service that does not exit 0
within the grace period is killed, and that is an error.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from assay import rm_server

EMBEDDED_SPEC = Path(rm_server.__file__).resolve().parent / "embedded.yaml"
EMBEDDED_JUDGE_PORT = 8001


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spec_for_policy_port(port: int, out_dir: Path, spec: Path = EMBEDDED_SPEC) -> Path:
    """A copy of `spec` whose judges ask the policy server on `port`, paths made absolute."""
    raw = yaml.safe_load(spec.read_text())
    for reward in raw["rewards"].values():
        if "path" in reward and not Path(reward["path"]).is_absolute():
            reward["path"] = str((spec.parent / reward["path"]).resolve())
        if reward.get("type") == "judge":
            reward["endpoint"] = reward["endpoint"].replace(f":{EMBEDDED_JUDGE_PORT}/", f":{port}/")
    out = out_dir / spec.name
    out.write_text(yaml.safe_dump(raw, sort_keys=False))
    return out


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen
    log: Path
    argv: list[str]
    env: dict[str, str]
    grpc_target: str | None = None  # host:port of its gRPC API, when it serves one

    def restart(self, timeout_s: float = 180.0, down_s: float = 0.0) -> None:
        """Kill the process (SIGKILL, as a crash would) and start it again on the same port,
        after `down_s` seconds (a slow restart); return once it is ready."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        time.sleep(down_s)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)
        self.wait_ready(timeout_s)

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}) while starting:\n{self.tail()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} was not ready within {timeout_s:g}s:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self, grace_s: float = 45.0) -> int:
        """SIGTERM, then wait; the exit status (killed after `grace_s`: an error). The default is the
        servers' default drain (30 s) plus time to close their models."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError(f"{self.name} did not stop within {grace_s:g}s of SIGTERM; killed") from None
        return self.proc.returncode

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@dataclass
class LocalServices:
    rm: Service
    policy: Service
    workdir: tempfile.TemporaryDirectory
    stopped: bool = field(default=False)

    @property
    def rm_url(self) -> str:
        return self.rm.url

    @property
    def policy_url(self) -> str:
        return self.policy.url

    @classmethod
    def start(
        cls,
        *,
        policy_args: Sequence[str] = (),
        rm_args: Sequence[str] = (),
        timeout_s: float = 180.0,
        torch_threads: int = 1,
        rm_grpc: bool = False,
        spec: Path = EMBEDDED_SPEC,
    ) -> LocalServices:
        """rm_server (the embedded spec, or `spec`; its gRPC API too with `rm_grpc`) and
        policy_server (embedded policy and verifier), ready."""
        workdir = tempfile.TemporaryDirectory(prefix="assay-services-")
        tmp = Path(workdir.name)
        rm_port, policy_port = free_port(), free_port()
        rm_grpc_port = str(free_port()) if rm_grpc else "none"
        spec = spec_for_policy_port(policy_port, tmp, spec)
        env = {**os.environ, "OMP_NUM_THREADS": str(torch_threads)}
        rm = _launch(
            "rm_server",
            [
                "--port",
                str(rm_port),
                "--grpc-port",
                rm_grpc_port,
                "--spec",
                str(spec),
                "--log-level",
                "warning",
                *rm_args,
            ],
            tmp,
            env,
        )
        if rm_grpc:
            rm.grpc_target = f"127.0.0.1:{rm_grpc_port}"
        policy = _launch(
            "policy_server",
            [
                "--port",
                str(policy_port),
                "--rm-url",
                rm.url,
                "--torch-threads",
                str(torch_threads),
                "--log-level",
                "warning",
                *policy_args,
            ],
            tmp,
            env,
        )
        services = cls(rm, policy, workdir)
        try:
            rm.wait_ready(timeout_s)
            policy.wait_ready(timeout_s)
        except BaseException:
            services.stop()
            raise
        return services

    def stop(self) -> dict[str, int]:
        """Stop both (policy first: it calls rm_server); their exit statuses."""
        if self.stopped:
            return {}
        self.stopped = True
        try:
            return {s.name: s.stop() for s in (self.policy, self.rm)}
        finally:
            self.workdir.cleanup()

    def __enter__(self) -> LocalServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _launch(name: str, args: list[str], tmp: Path, env: dict[str, str]) -> Service:
    """`python -m assay.<name>`, its output in `<name>.log`."""
    port = args[args.index("--port") + 1]
    log = tmp / f"{name}.log"
    argv = [sys.executable, "-m", f"assay.{name}", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    return Service(name, f"http://127.0.0.1:{port}", proc, log, argv, env)
