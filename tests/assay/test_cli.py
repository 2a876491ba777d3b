"""The `assay` command line stays cheap: help and refusals answer before torch, transformers or fastapi load.

Each case runs the real command in a fresh interpreter (`assay.cli.app`, as `assay ...` does) and
reports its exit status, its output and which heavy modules it imported by then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit

HEAVY = ("torch", "transformers", "fastapi", "uvicorn")
RUN = f"""
import contextlib, io, json, sys
out = io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    try:
        from assay.cli import app
        app(sys.argv[1:], prog_name="assay")
        code = 0
    except SystemExit as exc:
        code = exc.code
print(json.dumps({{"code": code, "output": out.getvalue(), "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def assay(*args: str, env: dict[str, str] | None = None) -> dict:
    env = {**os.environ, "ASSAY_API_KEYS": "", "ASSAY_POLICY_API_KEYS": "", "COLUMNS": "200", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--help"], "rm"),
        (["rm", "serve", "--help"], "--max-items"),
        (["policy", "serve", "--help"], "--max-batch"),
    ],
)
def test_help_imports_no_server_stack(args, shown):
    result = assay(*args)
    assert result["code"] == 0 and shown in result["output"], result
    assert result["heavy"] == []


LOG_LEVEL_CHOICES = "Invalid value for '--log-level'"  # then the choices, as rich wraps them


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["policy", "serve", "--backend", "nope"], "use one of transformers, vllm"),
        (["policy", "serve", "--model", "/nonexistent/absent"], "no such checkpoint directory"),
        (["policy", "serve", "--weights-dir", "/nonexistent/absent"], "--weights-dir /nonexistent/absent"),
        (["policy", "serve", "--host", "0.0.0.0"], "without API keys: pass --api-key KEY:generate"),
        (["policy", "serve", "--max-sequences", "64", "--max-queue", "32"], "lower max_sequences or raise max_queue"),
        (["policy", "serve", "--log-level", "loud"], LOG_LEVEL_CHOICES),
        (["rm", "serve", "--log-level", "loud"], LOG_LEVEL_CHOICES),
        (["rm", "serve", "--log-format", "xml"], "'xml' is not one of 'text', 'json'"),
        (["rm", "serve", "--host", "0.0.0.0"], "without API keys: pass --api-key KEY:score (or set ASSAY_API_KEYS)"),
        (["rm", "serve", "--spec", "/nonexistent/absent.yaml"], "does not exist"),
        (["rm", "serve", "--grpc-port", "70000"], "grpc_port must be a port number 0-65535"),
        (["rm", "serve", "--max-items", "0"], "max_items must be at least 1"),
    ],
)
def test_refusals_answer_before_the_server_stack_is_imported(args, reason):
    result = assay(*args)
    assert result["code"] == 2 and reason in result["output"], result
    assert result["heavy"] == []


@pytest.mark.parametrize(("command", "prefix"), [("rm", "ASSAY_RM"), ("policy", "ASSAY_POLICY")])
def test_a_loud_log_level_is_one_sentence_naming_the_choices(command, prefix):
    for result in (
        assay(command, "serve", "--log-level", "loud"),
        assay(command, "serve", env={f"{prefix}_LOG_LEVEL": "loud"}),
    ):
        assert result["code"] == 2 and "Traceback" not in result["output"], result
        text = " ".join(result["output"].replace("│", " ").split())  # rich's box, unwrapped
        assert "'loud' is not one of 'critical', 'error', 'warning', 'info', 'debug'" in text, text
        assert f"env var: '{prefix}_LOG_LEVEL'" in text
        assert result["heavy"] == []


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        ("rm", ("ASSAY_RM_PORT", "ASSAY_RM_SPEC", "ASSAY_RM_MAX_ITEMS", "ASSAY_RM_LOG_FORMAT", "ASSAY_RM_ACCESS_LOG")),
        ("policy", ("ASSAY_POLICY_PORT", "ASSAY_POLICY_MAX_BATCH", "ASSAY_POLICY_TORCH_THREADS", "ASSAY_RM_API_KEY")),
    ],
)
def test_help_lists_each_options_environment_variable(command, variables):
    result = assay(command, "serve", "--help")
    assert result["code"] == 0
    for name in variables:
        assert f"env var: {name}" in result["output"], name


def test_a_bad_value_in_a_variable_is_refused_naming_it():
    result = assay("rm", "serve", env={"ASSAY_RM_MAX_ITEMS": "many"})
    text = " ".join(result["output"].replace("│", " ").split())
    assert result["code"] == 2 and "Invalid value for '--max-items' (env var: 'ASSAY_RM_MAX_ITEMS')" in text, text
    result = assay("policy", "serve", env={"ASSAY_POLICY_MAX_SEQUENCES": "64", "ASSAY_POLICY_MAX_QUEUE": "32"})
    assert result["code"] == 2 and "lower max_sequences or raise max_queue" in result["output"]  # the config's check
