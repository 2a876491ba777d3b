"""The Ray Serve applications' arguments (`assay.deploy.app_args`) and `assay deploy ray`'s refusals:
pure, no Ray started. What `serve run ... key=value` and `--rm-arg key=value` give is checked by the
services' own config dataclasses, so a bad value names its key and a keyless public proxy is refused."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from assay.cli import app
from assay.deploy.app_args import Replicas, policy_args, rm_args

pytestmark = pytest.mark.unit
KEY = "k" * 16


def test_flag_names_set_the_services_config_and_the_replicas():
    config, replicas = rm_args({"max_items": "5", "model_workers": "false", "api_key": f"{KEY}:score {KEY}2"})
    assert config.limits.max_items == 5 and config.models.model_workers is False
    assert config.api_keys == (f"{KEY}:score", f"{KEY}2")  # a repeatable flag: whitespace-separated
    assert replicas == Replicas()
    _, replicas = rm_args({"num_replicas": "2", "num_cpus": "0.5", "num_gpus": 1})
    assert replicas.deployment_options() == {
        "ray_actor_options": {"num_cpus": 0.5, "num_gpus": 1.0},
        "max_ongoing_requests": 64,
        "num_replicas": 2,
    }


def test_max_replicas_turns_autoscaling_on():
    _, replicas = rm_args({"max_replicas": "3", "target_ongoing_requests": "4", "upscale_delay_s": "1"})
    scaling = replicas.deployment_options()["autoscaling_config"]
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] == 3 and scaling["initial_replicas"] == 1
    assert scaling["target_ongoing_requests"] == 4 and scaling["upscale_delay_s"] == 1
    assert "num_replicas" not in replicas.deployment_options()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ({"nope": "1"}, "unknown argument(s) nope; known: "),
        ({"max_items": "many"}, "limits.max_items: Input should be a valid integer"),
        ({"host": "0.0.0.0"}, "refusing to serve on 0.0.0.0 without API keys"),
        ({"port": "9000"}, "port: Serve's to set under Ray"),
        ({"max_replicas": "1", "num_replicas": "2"}, "min_replicas <= num_replicas <= max_replicas"),
    ],
)
def test_a_bad_argument_is_refused_naming_it(args, says):
    with pytest.raises(ValueError, match=None) as caught:
        rm_args(args)
    assert says in str(caught.value)


def test_the_policy_app_takes_a_model_directory(tmp_path):
    config, _ = policy_args({"model": str(tmp_path), "model_name": "mine"})
    assert config.models == {"mine": tmp_path}
    with pytest.raises(ValueError, match="no such checkpoint directory"):
        policy_args({"model": str(tmp_path / "missing")})


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--rm-arg", "nope=1"], "unknown argument(s) nope"),
        (["--rm-arg", "spec"], "expected KEY=VALUE"),
        (["--host", "0.0.0.0"], "without API keys"),
        (["--only", "policy", "--policy-arg", "max_n=x"], "limits.max_n"),
    ],
)
def test_assay_deploy_ray_refuses_before_ray_starts(argv, says, monkeypatch):
    monkeypatch.delenv("ASSAY_API_KEYS", raising=False)
    result = CliRunner().invoke(app, ["deploy", "ray", *argv])
    assert result.exit_code == 2 and says in result.output, result.output
