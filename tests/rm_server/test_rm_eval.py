"""`assay rm eval`: RewardBench's figures for a reward on a preference file, scored through the service.

The known-answer file is scored by a rule whose every score can be worked out by hand (DAPO's
length penalty), in process (rm_server's own serving layer behind `LocalTransport`) and over HTTP
against a real server on loopback; the held-out arithmetic pairs scored by the served ORM give
exactly `assay eval`'s ORM figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from assay.checkpoints import ARITH_DIR
from assay.clients import RewardClient
from assay.data import load_preferences
from assay.rm_server.config import ServerConfig
from assay.rm_server.local import LocalTransport
from assay.rm_server.rm_eval import evaluate
from assay.rm_server.server import BackgroundServer

pytestmark = pytest.mark.service

EVAL = [sys.executable, "-m", "assay", "rm", "eval"]

# short: 0 up to 10 characters, then -0.1 per character down to -1 at 20 (rule.length_penalty)
SPEC = """
rewards:
  short: {type: rule.length_penalty, max_length: 20, buffer: 10}
  exact: {type: rule.exact_match}
  down:  {type: judge, endpoint: "http://127.0.0.1:9/v1", model: verifier, timeout_s: 2}
  orm:   {type: model.outcome, path: %s, activation: sigmoid, max_tokens: 64}
""" % (ARITH_DIR / "orm")

ROWS = [
    # subset a: right (0 > -0.5), wrong (-1 < 0)
    {"prompt": "p1", "chosen": "short", "rejected": "x" * 15, "subset": "a"},
    {"prompt": "p2", "chosen": "x" * 20, "rejected": "ok", "subset": "a"},
    # subset b: a tie (0 = 0), and TRL's conversational form, right (0 > -0.8)
    {"prompt": "p3", "chosen": "abc", "rejected": "abcd", "subset": "b"},
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p4"}],
        "chosen": [{"role": "assistant", "content": "fine"}],
        "rejected": [{"role": "assistant", "content": "y" * 18}],
        "subset": "b",
    },
    # K-wise: the best against each worse one, both right (0 > -0.2, 0 > -1)
    {"prompt": "p5", "responses": ["a", "b" * 12, "c" * 30], "scores": [3, 2, 1]},
    # a response the service cannot take (two turns): its pair fails, counted, in no figure
    {
        "prompt": "p6",
        "chosen": [{"role": "assistant", "content": "one"}, {"role": "user", "content": "two"}],
        "rejected": [{"role": "assistant", "content": "three"}],
    },
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("rm_eval")
    (root / "spec.yaml").write_text(SPEC)
    (root / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


def test_accuracy_ties_margin_subsets_and_failures_on_known_scores(files):
    loaded = load_preferences(files / "prefs.jsonl")
    with RewardClient(LocalTransport(files / "spec.yaml", rewards=["short"])) as client:
        report = evaluate(client, "short", loaded, batch_size=3).as_json()
        assert report["reward_id"] == client.reward_id("short")
    # pairs: 1 right, 2 wrong, 3 tie, 4 right, 5 right twice; 6 failed
    assert report["pairs"] == 6 and report["failed_pairs"] == 1
    assert report["accuracy"] == pytest.approx(4 / 6)  # the tie counts as wrong (RewardBench)
    assert report["ties"] == 1 and report["accuracy_ties_half"] == pytest.approx(4.5 / 6)
    assert report["mean_margin"] == pytest.approx((0.5 - 1.0 + 0.0 + 0.8 + 0.2 + 1.0) / 6)
    a, b = report["subsets"]["a"], report["subsets"]["b"]
    assert (a["pairs"], a["accuracy"], a["ties"], a["mean_margin"]) == (2, 0.5, 0, pytest.approx(-0.25))
    assert (b["pairs"], b["accuracy"], b["ties"], b["mean_margin"]) == (2, 0.5, 1, pytest.approx(0.4))
    assert report["failures"] == {"invalid_input": 1}
    assert "two turns" not in report["failure_examples"][0] and "2 messages" in report["failure_examples"][0]
    assert report["rows"] == len(ROWS)


def test_failed_items_are_counted_never_scored_over_http(files):
    """Over HTTP, with the command: a judge that cannot be reached fails every item (typed), and an item
    over the ORM's max_tokens, which the service refuses for its whole batch, fails alone."""
    rows = [{"prompt": "2+2=", "chosen": "#### 4", "rejected": "#### 5"}] * 3
    rows.append({"prompt": "2+2=", "chosen": "#### 4", "rejected": "1+1=2 " * 40})  # over 64 tokens
    data = files / "failing.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with BackgroundServer(ServerConfig(spec=files / "spec.yaml", port=0, grpc_port=None)) as server:
        out = {}
        for reward in ("down", "orm"):
            proc = subprocess.run(
                [
                    *EVAL,
                    "--data",
                    str(data),
                    "--reward",
                    reward,
                    "--rm-url",
                    server.http_url,
                    "--json",
                    "--batch-size",
                    "8",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, proc.stderr
            out[reward] = json.loads(proc.stdout)
    down, orm = out["down"], out["orm"]
    assert down["pairs"] == 0 and down["failed_pairs"] == 4 and down["accuracy"] is None
    assert down["failures"] == {"judge_unavailable": 8}
    assert orm["pairs"] == 3 and orm["failed_pairs"] == 1 and orm["failures"] == {"invalid_request": 1}
    assert "row 3, response 1" in orm["failure_examples"][0] and "max_tokens" in orm["failure_examples"][0]
    assert orm["accuracy"] is not None and orm["reward_id"].startswith("sha256:")
    assert set(orm) >= {"reward", "reward_id", "pairs", "accuracy", "ties", "mean_margin", "subsets", "failures"}


def test_refusals_and_the_table(files):
    from assay.cli import app

    runner = CliRunner()
    base = ["rm", "eval", "--data", str(files / "prefs.jsonl"), "--spec", str(files / "spec.yaml")]
    table = runner.invoke(app, [*base, "--reward", "short"])
    assert table.exit_code == 0, table.output
    for word in ("subset", "accuracy", "ties", "mean margin", "66.7%", "sha256:", "invalid_input"):
        assert word in table.stdout
    # a reward that needs a reference, on rows that carry none: refused, with the reason
    needs = runner.invoke(app, [*base, "--reward", "exact"])
    assert needs.exit_code == 2 and "needs a reference" in needs.output
    both = runner.invoke(app, [*base, "--reward", "short", "--rm-url", "http://127.0.0.1:9"])
    assert both.exit_code == 2 and "not both" in both.output
    bad = files / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps({"prompt": "p", "chosen": 3, "rejected": "r"}) + "\n")
    refused = runner.invoke(
        app, ["rm", "eval", "--data", str(bad), "--spec", str(files / "spec.yaml"), "--reward", "short"]
    )
    assert refused.exit_code == 2 and "row 1" in refused.output and "'chosen'" in refused.output
    skipped = runner.invoke(
        app,
        [
            "rm",
            "eval",
            "--data",
            str(bad),
            "--spec",
            str(files / "spec.yaml"),
            "--reward",
            "short",
            "--skip-bad-rows",
            "--json",
        ],
    )
    assert skipped.exit_code == 0, skipped.output
    assert json.loads(skipped.stdout)["skipped_rows"] == 1 and json.loads(skipped.stdout)["pairs"] == 1


@pytest.mark.slow
def test_heldout_arithmetic_pairs_agree_with_assay_eval(tmp_path):
    """`assay data arith --kind preferences --split heldout` then `rm eval` with the served ORM gives
    `assay eval`'s ORM pairwise accuracy, overall and against well-formed wrong answers."""
    from assay.cli import app
    from assay.eval_config import EvalConfig
    from assay.evaluate import evaluate as assay_eval

    data = tmp_path / "heldout.jsonl"
    made = CliRunner().invoke(
        app, ["data", "arith", "--kind", "preferences", "--split", "heldout", "--count", "4", "--out", str(data)]
    )
    assert made.exit_code == 0, made.output
    with RewardClient(LocalTransport(rewards=["orm"]), timeout_s=300) as client:  # the embedded spec's ORM
        report = evaluate(client, "orm", load_preferences(data)).as_json()
    figures = assay_eval(EvalConfig(problems=4))
    assert report["pairs"] > 20 and report["failed_pairs"] == 0
    # assay eval counts a tie half; with the ORM's continuous scores there are none, so the two agree
    assert report["accuracy_ties_half"] == pytest.approx(figures["orm_pairwise_accuracy"], abs=1e-12)
    assert report["ties"] == 0 and report["accuracy"] == pytest.approx(figures["orm_pairwise_accuracy"], abs=1e-12)
    well_formed = report["subsets"]["well_formed"]["accuracy_ties_half"]
    assert well_formed == pytest.approx(figures["orm_pairwise_accuracy_well_formed"], abs=1e-12)


@pytest.mark.slow
def test_tiny_chat_orm_beats_chance_on_its_preferences(tiny_chat):
    """The chain's step: the tiny-chat ORM (its own tokenizer and template) served from the fixture's spec,
    on its held-out conversational preference file; every pair is scored and more than half are ordered right."""
    loaded = load_preferences(tiny_chat / "eval_preferences.jsonl")
    with RewardClient(LocalTransport(tiny_chat / "rm.yaml", rewards=["orm"]), timeout_s=300) as client:
        report = evaluate(client, "orm", loaded).as_json()
    assert report["failed_pairs"] == 0 and report["pairs"] == len(loaded.rows)
    assert report["accuracy"] > 0.5, report
    assert report["subsets"], "the fixture's rows carry a subset"
