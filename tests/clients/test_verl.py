"""veRL's function reward (`assay.clients.verl.compute_score`) against a real rm_server on loopback.

veRL runs the function in Ray workers: pickled (cloudpickle, as Ray does) in one process and called
in another. The tests do that with a spawned Python (no fork: nothing of this process is inherited),
before the first call and, for the file veRL loads by path, after it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import cloudpickle
import pytest

import assay.clients.verl as verl
from assay.rm_server.config import ServerConfig
from assay.rm_server.protocol import ErrorType
from assay.rm_server.server import BackgroundServer

pytestmark = pytest.mark.service

RIGHT = "23+45=68 68-17=51 #### 51"
WRONG = "23+45=68 68-17=52 #### 52"
SPEC = """
rewards:
  correct: {type: rule.exact_match, answer_pattern: "####\\\\s*(-?\\\\d+)\\\\s*$"}
  down:    {type: judge, endpoint: "http://127.0.0.1:9/v1", model: verifier, timeout_s: 2}
"""
# The worker's side: the pickled function from stdin, called as veRL's reward manager calls it.
WORKER = """
import pickle, sys
fn = pickle.loads(sys.stdin.buffer.read())
for text, truth in ((sys.argv[1], "51"), (sys.argv[1], 52)):
    print(fn(data_source="arith", solution_str=text, ground_truth=truth, extra_info={"index": 0}))
"""


@pytest.fixture(scope="module")
def rm_url(tmp_path_factory):
    spec = tmp_path_factory.mktemp("verl") / "rewards.yaml"
    spec.write_text(SPEC)
    with BackgroundServer(ServerConfig(spec=spec, port=0, grpc_port=None)) as s:
        yield s.http_url


def _in_a_worker(blob: bytes, env: dict[str, str] | None = None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", WORKER, RIGHT],
        input=blob,
        capture_output=True,
        timeout=120,
        env={**os.environ, **(env or {})},
        check=False,
    )
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode().split()


def test_compute_score_pickled_before_first_use_scores_in_another_process(rm_url):
    """By reference (pickle; `pkg://assay.clients.verl`), configured from the environment."""
    env = {"ASSAY_RM_URL": rm_url, "ASSAY_REWARD": "correct"}
    assert _in_a_worker(pickle.dumps(verl.compute_score), env) == ["1.0", "0.0"]


def test_compute_score_loaded_by_path_pickles_by_value_after_use(rm_url):
    """veRL's file path form: the module gets a name of its own (verl.utils.import_utils.load_module),
    cloudpickle pickles the function by value, and a client this process made does not travel."""
    path = Path(verl.__file__)
    spec = importlib.util.spec_from_file_location(f"custom_module_{hash(str(path))}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # veRL binds reward_kwargs with functools.partial (verl.trainer.ppo.reward._call_with_kwargs)
    fn = functools.partial(module.compute_score, url=rm_url, reward="correct")
    assert fn(data_source="arith", solution_str=RIGHT, ground_truth="51") == 1.0
    assert verl._clients  # this process's client: in the importable module
    assert _in_a_worker(cloudpickle.dumps(fn)) == ["1.0", "0.0"]


def test_a_failed_item_raises_a_typed_error_never_a_zero(rm_url):
    with pytest.raises(verl.RewardFailed) as failed:
        verl.compute_score("arith", RIGHT, "51", url=rm_url, reward="down")
    assert failed.value.type == ErrorType.judge_unavailable and failed.value.reward_id.startswith("sha256:")
    with pytest.raises(ValueError, match="name the reward"):
        verl.compute_score("arith", RIGHT, "51", url=rm_url)
    with pytest.raises(ValueError, match="extra_info has no 'question'"):
        verl.compute_score("arith", RIGHT, "51", {"index": 1}, url=rm_url, reward="correct", prompt_key="question")
