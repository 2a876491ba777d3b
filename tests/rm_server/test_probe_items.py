"""`assay rm probe --items`: the domain-agnostic bias probe on a user's own items, through the service.

Rules whose scores are known by hand show the figures are computed right: DAPO's length penalty
moves under padding (and its pair flips down), an answer check ignores presentation altogether,
and a reward that likes a flattering opener flips a pair up under it.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from assay.clients import RewardClient
from assay.rm_server.local import LocalTransport
from assay.rm_server.probe_items import PERTURBATIONS, load_items, probe
from assay.rm_server.rewards.rules import length_penalty

pytestmark = pytest.mark.service

SPEC = """
rewards:
  short:  {type: rule.length_penalty, max_length: 100, buffer: 50}
  exact:  {type: rule.exact_match, answer_pattern: "ANSWER: (\\\\d+)"}
  opener: {type: rule.regex, pattern: "Great question"}
  flattered: {type: composite, expr: "opener + short"}
"""

FILLER = "ANSWER: 4, which is what two and two make when added."  # 52 characters
ITEMS = [  # two responses per prompt: a short one (penalty 0) and one of 60 characters (penalty -0.2)
    {"prompt": "What is 2+2?", "response": "ANSWER: 4", "reference": "4", "source": "hand"},
    {"prompt": "What is 2+2?", "response": FILLER.ljust(60, "."), "reference": "4"},
    {"prompt": [{"role": "user", "content": "And 3+4?"}], "response": "ANSWER: 7", "reference": "7"},
    {"prompt": [{"role": "user", "content": "And 3+4?"}], "response": "ANSWER: 7".ljust(60, "!"), "reference": "7"},
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_items")
    (root / "spec.yaml").write_text(SPEC)
    (root / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    return root


def _penalty(text: str) -> float:
    return length_penalty(len(text), 100, 50, 1.0)


def test_shifts_and_flips_are_what_the_rules_predict(files):
    items, pairs, loaded = load_items(str(files / "items.jsonl"))
    assert len(items) == 4 and pairs == [(0, 1), (2, 3)] and not loaded.skipped
    assert (
        items[0].reference == "4"
        and items[0].metadata == {"source": "hand"}
        and items[2].prompt == [{"role": "user", "content": "And 3+4?"}]
    )
    with RewardClient(LocalTransport(files / "spec.yaml")) as client:
        table, ids = probe(client, ["short", "exact", "flattered"], items, pairs, batch_size=3)
        assert ids["short"] == client.reward_id("short")
    for name, perturb in PERTURBATIONS.items():
        cell = table["short"][name]
        shifts = [_penalty(perturb(it.response)) - _penalty(it.response) for it in items]
        assert cell.mean_shift == pytest.approx(sum(shifts) / 4), name
        assert cell.scored == 4 and cell.failed == 0 and cell.pairs == 2
        # an answer check reads the answer, and no perturbation touches it
        assert table["exact"][name].mean_shift == 0.0 and table["exact"][name].failed == 0, name
        assert table["exact"][name].pairs == 0 and table["exact"][name].flip_up is None  # both right: no order
    padding = table["short"]["length padding"]
    # padded, every response is past 100 characters (-1): the short side falls below the long one's -0.2
    assert padding.mean_shift == pytest.approx(-(1 + 1 + 0.8 + 0.8) / 4) and padding.effect is not None
    assert (padding.flip_up, padding.flip_down) == (0.0, 1.0)
    # the opener wins the long side 1 point for a penalty of under 1: it now beats the short one
    opener = table["flattered"]["affirmative opener"]
    assert (opener.flip_up, opener.flip_down) == (1.0, 0.0) and opener.mean_shift > 0.5


def test_preference_rows_and_failures(files):
    prefs = files / "prefs.jsonl"
    rows = [
        {"prompt": "q", "chosen": "ANSWER: 1", "rejected": "ANSWER: 1".ljust(70, ".")},
        {"prompt": "q2", "responses": ["a", "b" * 60, "c" * 80], "scores": [1, 2, 3]},
    ]
    prefs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, pairs, _ = load_items(str(prefs))
    assert [it.response[:1] for it in items] == ["A", "A", "a", "b", "c"]
    assert pairs == [(0, 1), (2, 3), (2, 4), (3, 4)]  # chosen/rejected, and every two responses of a K-wise row
    with RewardClient(LocalTransport(files / "spec.yaml", rewards=["short", "exact"])) as client:
        table, _ = probe(client, ["short", "exact"], items, pairs)
    assert table["short"]["emoji"].pairs == 4 and table["short"]["emoji"].failed == 0
    # preference rows carry no reference: the answer check fails every item, typed, and shows nothing
    assert all(c.failed == 5 and c.mean_shift is None and c.flip_up is None for c in table["exact"].values())


def test_the_command(files):
    from assay.cli import app

    runner = CliRunner()
    base = ["rm", "probe", "--items", str(files / "items.jsonl"), "--spec", str(files / "spec.yaml")]
    out = runner.invoke(app, [*base, "--reward", "short", "--reward", "exact", "--json"])
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report["responses"] == 4 and report["pairs"] == 2 and set(report["reward_ids"]) == {"short", "exact"}
    assert set(report["perturbations"]["short"]) == set(PERTURBATIONS)
    assert report["perturbations"]["short"]["length padding"]["flip_down"] == 1.0
    table = runner.invoke(app, [*base, "--reward", "short"])
    assert table.exit_code == 0, table.output
    for word in ("refusal boilerplate", "markdown header", "0% / 100%", "sha256:"):
        assert word in table.stdout
    bad = files / "bad.jsonl"
    bad.write_text(json.dumps(ITEMS[0]) + "\n" + json.dumps({"prompt": "p", "response": None}) + "\n")
    refused = runner.invoke(app, ["rm", "probe", "--items", str(bad), "--spec", str(files / "spec.yaml")])
    assert refused.exit_code == 2 and "row 1" in refused.output and "'response'" in refused.output
    no_items = runner.invoke(app, ["rm", "probe", "--rm-url", "http://127.0.0.1:9"])
    assert no_items.exit_code == 2 and "--items" in no_items.output
    no_server = runner.invoke(
        app, ["rm", "probe", "--items", str(files / "items.jsonl"), "--rm-url", "http://127.0.0.1:9"]
    )
    assert no_server.exit_code == 2 and "no reward service answers at http://127.0.0.1:9" in no_server.output
