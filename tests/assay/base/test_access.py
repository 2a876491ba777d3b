"""Request ids and access lines (assay.base.access, assay.base.logs) on the real reward server over
loopback HTTP and gRPC, and on the runtime's own answers (a bug's 500, the drain's 503); the JSON log
of a real `python -m assay.rm_server` subprocess, its options set by ASSAY_RM_* variables."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys

import grpc
import httpx
import pytest
from fastapi import FastAPI

from assay.base.access import request_id
from assay.base.connections import Connections
from assay.base.logs import JsonFormatter, RequestIdFilter
from assay.base.serve import BackgroundServer, HttpListener
from assay.proto.reward.v1 import reward_pb2 as pb
from assay.proto.reward.v1 import reward_pb2_grpc
from assay.rm_server.config import Limits, ServerConfig
from assay.rm_server.server import BackgroundServer as RewardBackgroundServer
from assay.rm_server.server import error_reply
from assay.services import free_port
from tests.helpers import wait_for, wait_ready

pytestmark = pytest.mark.service

NEW_ID = re.compile(r"[0-9a-f]{32}")  # uuid4 hex
ITEM = {"id": "a", "prompt": "Q: 1+1 A: ", "response": "1+1=2 #### 2"}


@pytest.fixture(scope="module")
def server(rules_spec):
    config = ServerConfig(spec=rules_spec, port=0, grpc_port=0, limits=Limits(max_body_bytes=4096))
    with RewardBackgroundServer(config) as s:
        yield s


@pytest.fixture
def records():
    """Every record the process logs at info and above while the test runs, as the servers' handler
    sees it (the request-id filter), and each formatted as a JSON line."""
    seen: list[tuple[logging.LogRecord, str]] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record, self.format(record)))

    handler = Keep()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter())
    root, access = logging.getLogger(), logging.getLogger("assay.access")
    levels = root.level, access.level
    root.addHandler(handler)
    access.setLevel(logging.INFO)
    try:
        yield seen
    finally:
        root.removeHandler(handler)
        access.setLevel(levels[1])


def access_lines(seen) -> list[dict]:
    return [json.loads(line) for record, line in list(seen) if record.name == "assay.access"]


def by_id(seen, *ids: str) -> dict[str, dict]:
    """The access lines by request id, once those of `ids` are in: a line is written as its request
    ends, which can be just after the client has its answer."""
    wait_for(lambda: set(ids) <= {line["request_id"] for line in access_lines(seen)}, 60, f"no access line for {ids}")
    return {line["request_id"]: line for line in access_lines(seen)}


@pytest.mark.unit
def test_a_sane_client_id_is_kept_anything_else_replaced():
    assert request_id("trace-7f3a_01:x") == "trace-7f3a_01:x"
    assert request_id("x" * 128) == "x" * 128
    for offered in (None, "", "has space", "x" * 129, "line\nbreak", "naïve", "tab\there"):
        assert NEW_ID.fullmatch(request_id(offered)), offered
    assert request_id(None) != request_id(None)


def test_http_answers_echo_the_id_or_a_new_one_refusals_included(server, records):
    url = server.http_url
    with httpx.Client(base_url=url, timeout=30) as client:
        ok = client.post("/v1/score", json={"reward": "format", "items": [ITEM]}, headers={"X-Request-Id": "ok-1"})
        made = client.get("/health")
        insane = client.get("/health", headers={"X-Request-Id": "two words"})
        unknown = client.post("/v1/score", json={"reward": "nope", "items": [ITEM]}, headers={"X-Request-Id": "r-404"})
        big = {"reward": "format", "items": [ITEM | {"response": "x" * 8000}]}
        too_large = client.post("/v1/score", json=big, headers={"X-Request-Id": "r-413"})
        cross_site = client.post(
            "/v1/score",
            json={"reward": "format", "items": [ITEM]},
            headers={"X-Request-Id": "r-403", "Host": "evil.test"},
        )
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "ok-1"
    assert NEW_ID.fullmatch(made.headers["x-request-id"]) and NEW_ID.fullmatch(insane.headers["x-request-id"])
    for r, code, rid in ((unknown, 404, "r-404"), (too_large, 413, "r-413"), (cross_site, 403, "r-403")):
        assert r.status_code == code and r.headers["x-request-id"] == rid, (r.status_code, r.text)

    lines = by_id(records, "ok-1", "r-404", "r-413", "r-403", made.headers["x-request-id"])
    assert lines["ok-1"]["path"] == "/v1/score" and lines["ok-1"]["status"] == 200
    assert lines["ok-1"]["method"] == "POST" and lines["ok-1"]["reward"] == "format"
    assert lines["ok-1"]["bytes_out"] == len(ok.content) and lines["ok-1"]["duration_ms"] >= 0
    assert lines["ok-1"]["client"].startswith("127.0.0.1:")
    assert {lines[rid]["status"] for rid in ("r-404", "r-413", "r-403")} == {404, 413, 403}
    assert lines[made.headers["x-request-id"]]["path"] == "/health"
    for line in access_lines(records):
        assert {"time", "level", "logger", "message", "process"} <= line.keys()


def test_grpc_calls_send_the_id_in_the_initial_metadata_failures_included(server, records):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        _, call = stub.ListRewards.with_call(pb.ListRewardsRequest(), metadata=(("x-request-id", "g-1"),), timeout=30)
        _, made = stub.ListRewards.with_call(pb.ListRewardsRequest(), timeout=30)
        with pytest.raises(grpc.RpcError) as failed:
            stub.Score(pb.ScoreRequest(reward="nope"), metadata=(("x-request-id", "g-404"),), timeout=30)
    assert dict(call.initial_metadata())["x-request-id"] == "g-1"
    assert NEW_ID.fullmatch(dict(made.initial_metadata())["x-request-id"])
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert dict(failed.value.initial_metadata())["x-request-id"] == "g-404"

    lines = by_id(records, "g-1", "g-404")
    assert lines["g-1"]["path"] == "/assay.reward.v1.RewardService/ListRewards" and lines["g-1"]["status"] == "OK"
    assert lines["g-404"]["status"] == "NOT_FOUND" and lines["g-404"]["method"] == "grpc"


class _Faulty:
    """A server whose one route raises (a bug, as the runtime sees it) and one that waits (work in flight)."""

    def __init__(self) -> None:
        self.http = HttpListener("127.0.0.1")

    async def start(self) -> None:
        app = FastAPI()

        @app.get("/boom")
        async def boom():
            logging.getLogger("test.access").warning("about to fail")
            raise ZeroDivisionError("the bug's own message")

        @app.get("/slow")
        async def slow():
            await asyncio.sleep(600)

        await self.http.start(app, 0, "warning", error_reply, Connections())

    async def wait(self) -> None:
        await self.http.wait()

    async def stop(self) -> None:
        await self.http.stop()


def test_an_error_logged_while_serving_carries_the_id_and_so_do_the_500_and_the_drains_503(records):
    background = BackgroundServer(_Faulty)
    with background as faulty, httpx.Client(base_url=faulty.http.url, timeout=60) as client:
        bug = client.get("/boom", headers={"X-Request-Id": "bug-1"})
        asyncio.run_coroutine_threadsafe(faulty.http.drain(0), background._loop).result(timeout=60)
        refused = client.get("/slow", headers={"X-Request-Id": "late-1"})
    assert bug.status_code == 500 and bug.headers["x-request-id"] == "bug-1"
    assert refused.status_code == 503 and refused.headers["x-request-id"] == "late-1"
    logged = {record.getMessage(): record for record, _ in records if record.name != "assay.access"}
    assert logged["about to fail"].request_id == "bug-1"
    assert logged["unexpected error on GET /boom"].request_id == "bug-1"  # the runtime's own error line
    error_line = json.loads(next(line for record, line in records if record.getMessage().startswith("unexpected")))
    assert error_line["request_id"] == "bug-1" and "ZeroDivisionError" in error_line["exc_info"]
    lines = by_id(records, "bug-1", "late-1")
    assert lines["bug-1"]["status"] == 500 and lines["late-1"]["status"] == 503


def _serve(spec, env: dict[str, str], log, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "assay.rm_server", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ASSAY_RM_SPEC": str(spec), "ASSAY_RM_PORT": str(port), "ASSAY_RM_GRPC_PORT": "none", **env},
    )
    return proc, f"http://127.0.0.1:{port}"


def test_the_servers_log_is_json_lines_and_the_access_log_can_be_turned_off(rules_spec, tmp_path):
    """Options from ASSAY_RM_* variables (spec, port, format), a flag beside them (--no-access-log)."""
    logs = {}
    for name, env, args in (("json", {"ASSAY_RM_LOG_FORMAT": "json"}, ()), ("quiet", {}, ("--no-access-log",))):
        logs[name] = tmp_path / f"{name}.log"
        with logs[name].open("wb") as log:
            proc, url = _serve(rules_spec, env, log, *args)
            try:
                wait_ready(proc, url, log=logs[name])
                r = httpx.post(
                    f"{url}/v1/score", json={"reward": "format", "items": [ITEM]}, headers={"X-Request-Id": name}
                )
                assert r.status_code == 200 and r.headers["x-request-id"] == name
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
        assert proc.returncode == 0, logs[name].read_text()

    lines = [json.loads(line) for line in logs["json"].read_text().splitlines()]  # every line parses
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    [score] = [line for line in lines if line.get("request_id") == "json"]
    assert score["logger"] == "assay.access" and score["status"] == 200 and score["reward"] == "format"
    assert any(line["logger"] == "uvicorn.error" for line in lines)  # uvicorn's own records too
    assert any("reward service ready" in line["message"] for line in lines)

    quiet = logs["quiet"].read_text()
    assert "reward service ready" in quiet and "assay.access" not in quiet and "/v1/score" not in quiet
