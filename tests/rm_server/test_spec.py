"""Spec files and content-addressed reward ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from assay.checkpoints import ARITH_DIR
from assay.rm_server.spec import SpecError, load_spec, parse_spec, reward_ids

pytestmark = pytest.mark.unit


def ids_of(rewards: dict, base: Path = Path(".")) -> dict[str, str]:
    return reward_ids(parse_spec({"rewards": rewards}, base_dir=base))


ORM = {"type": "model.outcome", "path": str(ARITH_DIR / "orm")}
JUDGE = {"type": "judge", "endpoint": "http://127.0.0.1:8001/v1", "model": "verifier"}


def test_embedded_spec_declares_the_required_rewards():
    spec = load_spec()
    assert {"correct", "format", "orm", "prm", "judge", "final"} <= set(spec.rewards)
    assert spec.model_path("orm") == (ARITH_DIR / "orm").resolve()


def test_ids_are_stable_and_independent_of_name_and_runtime_fields():
    a = ids_of({"orm": ORM})
    assert a == ids_of({"orm": ORM})
    assert ids_of({"other_name": ORM})["other_name"] == a["orm"]
    runtime = {**ORM, "backend": "vllm", "max_wait_ms": 50, "max_batch_items": 7, "max_queue": 9}
    runtime |= {"device": "cuda", "dtype": "bfloat16"}  # bf16 on a GPU is the same reward, up to rounding
    assert ids_of({"orm": runtime})["orm"] == a["orm"]


def test_the_padded_batch_budget_defaults_by_device_and_a_given_one_wins():
    def budget(**fields):
        return parse_spec({"rewards": {"orm": {**ORM, **fields}}}).rewards["orm"].batch_tokens()

    assert budget() == 4096  # on a CPU, tight batches keep mixed lengths apart
    assert budget(device="cuda") == 16384
    assert budget(device="cpu", max_batch_tokens=900) == budget(device="cuda", max_batch_tokens=900) == 900
    assert ids_of({"orm": {**ORM, "max_batch_tokens": 900}})["orm"] == ids_of({"orm": ORM})["orm"]


@pytest.mark.parametrize(
    "change",
    [{"activation": "sigmoid"}, {"template": "{prompt} {response}"}, {"max_tokens": 100}, {"chat_template": True}],
)
def test_defining_spec_fields_change_the_id(change):
    assert ids_of({"orm": {**ORM, **change}})["orm"] != ids_of({"orm": ORM})["orm"]


def _copy_orm(tmp_path: Path) -> Path:
    dst = tmp_path / "orm"
    shutil.copytree(ARITH_DIR / "orm", dst)
    return dst


def test_weights_tokenizer_and_chat_template_change_the_id(tmp_path):
    base = ids_of({"orm": ORM})["orm"]
    copy = _copy_orm(tmp_path)
    same = ids_of({"orm": {**ORM, "path": str(copy)}})["orm"]
    assert same == base  # the id follows the content, not the path

    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # flip one bit of the last weight
    weights.write_bytes(bytes(data))
    assert ids_of({"orm": {**ORM, "path": str(copy)}})["orm"] != base

    copy2 = _copy_orm(tmp_path / "2")
    cfg_path = copy2 / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{{ messages[0].content }}"
    cfg_path.write_text(json.dumps(cfg))
    assert ids_of({"orm": {**ORM, "path": str(copy2)}})["orm"] != base

    copy3 = _copy_orm(tmp_path / "3")
    tok = json.loads((copy3 / "tokenizer.json").read_text())
    tok["added_tokens"][0]["content"] = "<PAD>"
    (copy3 / "tokenizer.json").write_text(json.dumps(tok))
    assert ids_of({"orm": {**ORM, "path": str(copy3)}})["orm"] != base


def test_judge_prompt_and_composite_parts_change_the_id():
    base = ids_of({"judge": JUDGE})["judge"]
    assert ids_of({"judge": {**JUDGE, "template": "{prompt}{response}\nRight? "}})["judge"] != base
    assert ids_of({"judge": {**JUDGE, "model": "other"}})["judge"] != base
    assert ids_of({"judge": {**JUDGE, "timeout_s": 3}})["judge"] == base

    fmt = {"type": "rule.regex", "pattern": "####"}
    comp = {"type": "composite", "expr": "0.5*a + 0.5*b"}
    one = ids_of({"a": fmt, "b": ORM, "c": comp})["c"]
    assert ids_of({"a": fmt, "b": {**ORM, "activation": "sigmoid"}, "c": comp})["c"] != one  # a part changed
    assert ids_of({"a": fmt, "b": ORM, "c": {**comp, "expr": "0.6*a + 0.4*b"}})["c"] != one


def test_math_equal_answer_is_in_the_id_and_the_older_spelling_keeps_its_id():
    plain = {"type": "rule.math_equal"}
    pattern = r"####\s*(-?\d+)\s*$"
    older = ids_of({"c": {**plain, "answer_pattern": pattern}})["c"]
    assert ids_of({"c": {**plain, "answer": {"how": "regex", "pattern": pattern}}})["c"] == older
    found = {how: ids_of({"c": {**plain, "answer": {"how": how}}})["c"] for how in ("hashes", "boxed", "last_number")}
    assert len({older, ids_of({"c": plain})["c"], *found.values()}) == 5  # each way of finding the answer its own id
    # the id main had before `answer` existed (the embedded `correct` is this spec)
    assert older == "sha256:22e48b4340f76d30a8ec177ecc7e7132a879f933e3babff361a6c41d1ef094ea"


@pytest.mark.parametrize(
    ("rewards", "message"),
    [
        ({}, "at least one reward"),
        ({"x": {"type": "rule.nope"}}, "rule.nope"),
        ({"x": {"type": "rule.regex"}}, "pattern"),
        ({"x": {"type": "rule.regex", "pattern": "a", "patern": "b"}}, "patern"),
        ({"x y": {"type": "rule.regex", "pattern": "a"}}, "identifier"),
        ({"c": {"type": "composite", "expr": "a + 1"}}, "'a'"),
        ({"c": {"type": "composite", "expr": "__import__('os')"}}, "may only use"),
        ({"c": {"type": "composite", "expr": "d"}, "d": {"type": "composite", "expr": "c"}}, "cycle"),
        ({"j": {**JUDGE, "endpoint": "/tmp/socket"}}, "http"),
        ({"m": {"type": "rule.math_equal", "answer": {"how": "boxd"}}}, "boxed"),
        ({"m": {"type": "rule.math_equal", "answer": {"how": "regex", "pattern": "(x"}}}, "not a valid regular"),
        ({"m": {"type": "rule.math_equal", "answer": {"how": "boxed"}, "answer_pattern": "(x)"}}, "not both"),
    ],
)
def test_bad_specs_are_refused_with_a_message(rewards, message):
    with pytest.raises(SpecError, match=message):
        parse_spec({"rewards": rewards})


def test_spec_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rewards: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
    rel = tmp_path / "rel.yaml"
    shutil.copytree(ARITH_DIR / "orm", tmp_path / "ck")
    rel.write_text(yaml.safe_dump({"rewards": {"orm": {"type": "model.outcome", "path": "ck"}}}))
    assert load_spec(rel).model_path("orm") == (tmp_path / "ck").resolve()
