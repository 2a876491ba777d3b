"""`assay --version` / `-V`: the installed distribution's version (and the checkout's commit), through
typer's runner and through the installed `assay` script."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

from assay.cli import app
from assay.version import version_text

pytestmark = pytest.mark.unit

# `assay 0.1.0`, or from a git checkout `assay 0.1.0 (git 599db802129b)` (`-dirty` with local changes)
LINE = re.compile(rf"assay {re.escape(version('assay'))}( \(git [0-9a-f]{{7,40}}(-dirty)?\))?")


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_flag_prints_the_installed_version_and_exits(flag):
    result = CliRunner().invoke(app, [flag])
    assert result.exit_code == 0, result.output
    assert LINE.fullmatch(result.output.strip()), result.output
    assert result.output.strip() == version_text()


def test_the_installed_entry_point_answers_it():
    script = Path(sys.executable).parent / "assay"
    command = str(script) if script.exists() else shutil.which("assay")
    assert command, "the assay script is not installed beside this interpreter"
    for flag in ("--version", "-V"):
        done = subprocess.run([command, flag], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert LINE.fullmatch(done.stdout.strip()), done.stdout


def test_a_checkout_names_its_commit():
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not run from a git checkout")
    head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    commit = re.search(r"\(git ([0-9a-f]+)", version_text())
    assert commit is not None and head.startswith(commit.group(1))
