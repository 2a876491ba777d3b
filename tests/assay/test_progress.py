"""Progress bars of `assay eval` and `assay rm probe`: on stderr, on a terminal only, never with --json.

The commands run in-process through typer's runner; `TTY_COMPATIBLE=1` makes rich take the captured
stderr for a terminal, so the tests see what a terminal would show. (Not a terminal: no bar, which the
`--json` runs of tests/assay/test_evaluate.py and tests/rm_server/test_cli.py read through a pipe.)"""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from assay.cli import app
from tests.helpers import torch_threads

pytestmark = pytest.mark.unit

TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "160"}
RULES = {
    "rewards": {
        "format": {"type": "rule.regex", "pattern": "#### -?\\d+$"},
        "long": {"type": "rule.length_penalty", "max_length": 60, "buffer": 10},
    }
}


def invoke(*args: str, env: dict[str, str]):
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow  # two evaluations of 2 problems: ~12 s
def test_eval_shows_a_bar_per_stage_on_a_terminal_and_none_with_json():
    with torch_threads(1):
        shown = invoke("eval", "--problems", "2", env=TERMINAL)
        quiet = invoke("eval", "--json", "--problems", "2", env=TERMINAL)
    for stage in ("policy samples", "outcome RM", "process RM", "verifier"):
        assert stage in shown.stderr, shown.stderr
    assert "128/128" in shown.stderr  # 2 problems x 64 samples
    assert "Held-out evaluation" in shown.stdout and "policy samples" not in shown.stdout
    assert json.loads(quiet.stdout)["heldout_problems"] == 2  # stdout is the one object
    assert quiet.stderr == ""


def test_probe_shows_its_bar_on_a_terminal_and_none_with_json(tmp_path):
    spec = tmp_path / "rules.yaml"
    spec.write_text(yaml.safe_dump(RULES))
    shown = invoke("rm", "probe", "--spec", str(spec), "--problems", "2", env=TERMINAL)
    assert "scoring" in shown.stderr and "64/64" in shown.stderr, shown.stderr  # 2 rewards x 4 responses x 8 versions
    assert "length padding" in shown.stdout

    items = tmp_path / "items.jsonl"
    rows = [{"prompt": "Q: 1+1 A: ", "response": f"1+1={n} #### {n}"} for n in (1, 2, 3)]
    items.write_text("".join(json.dumps(row) + "\n" for row in rows))
    quiet = invoke("rm", "probe", "--items", str(items), "--spec", str(spec), "--json", env=TERMINAL)
    assert json.loads(quiet.stdout)["responses"] == 3 and quiet.stderr == ""
    shown = invoke("rm", "probe", "--items", str(items), "--spec", str(spec), env=TERMINAL)
    assert "scoring" in shown.stderr
