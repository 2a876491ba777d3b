"""assay.cli_options: a config dataclass's fields as a typer command's options, and `build` from layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from assay.cli_options import build, config_options, options

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Bounds:
    max_items: int = field(default=1024, metadata={"help": "items per request"})
    timeout_s: float = field(default=60.0, metadata={"help": "seconds per request", "flag": "timeout"})


@dataclass(frozen=True)
class Config:
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    grpc_port: int | None = field(default=50051, metadata={"help": "gRPC port; none: no gRPC"})
    spec: Path | None = field(default=None, metadata={"help": "a spec file"})
    api_keys: tuple[str, ...] = field(
        default=(), metadata={"help": "KEY:scope", "flag": "api-key", "env": "TEST_CLI_OPTIONS_KEYS"}
    )
    mode: Literal["fast", "exact"] = field(default="fast", metadata={"help": "how"})
    verbose: bool = field(default=False, metadata={"help": "say more"})
    log_level: str = field(default="warning", metadata={"help": "log level"})
    bounds: Bounds = field(default_factory=Bounds, metadata={"help": "Bounds"})
    models: dict[str, Path] | None = field(default=None, metadata={"cli": False})

    def __post_init__(self) -> None:
        if self.bounds.max_items < 1:
            raise ValueError(f"max_items must be at least 1, not {self.bounds.max_items}")


def run(args: list[str], **kw) -> tuple[object, dict]:
    """Invoke a one-command app over Config; returns the result and what the command received."""
    seen: dict = {}
    app = typer.Typer()

    @app.command()
    @config_options(Config, defaults={"log_level": "info"})
    def serve(given: dict, torch_threads: int = typer.Option(None, help="not a config field")) -> None:
        seen.update(given=given, config=build(Config, given), torch_threads=torch_threads)

    return CliRunner().invoke(app, args, **kw), seen


def test_nothing_given_builds_the_defaults_but_the_commands_own():
    result, seen = run([])
    assert result.exit_code == 0, result.output
    assert seen["given"] == {"log_level": "info"}
    assert seen["config"] == Config(log_level="info")
    assert seen["torch_threads"] is None


def test_flags_set_fields_nested_ones_flattened():
    result, seen = run(
        [
            "--host",
            "0.0.0.0",
            "--grpc-port",
            "none",
            "--spec",
            "s.yaml",
            "--api-key",
            "a:score",
            "--api-key",
            "b:admin",
            "--mode",
            "exact",
            "--verbose",
            "--max-items",
            "3",
            "--timeout",
            "2.5",
            "--torch-threads",
            "1",
        ]
    )
    assert result.exit_code == 0, result.output
    assert seen["config"] == Config(
        host="0.0.0.0",
        grpc_port=None,
        spec=Path("s.yaml"),
        api_keys=("a:score", "b:admin"),
        mode="exact",
        verbose=True,
        log_level="info",
        bounds=Bounds(max_items=3, timeout_s=2.5),
    )
    assert seen["given"]["bounds"] == {"max_items": 3, "timeout_s": 2.5}
    assert seen["torch_threads"] == 1


def test_an_environment_variable_counts_as_given():
    result, seen = run([], env={"TEST_CLI_OPTIONS_KEYS": "k1:score k2:score"})
    assert result.exit_code == 0, result.output
    assert seen["config"].api_keys == ("k1:score", "k2:score")


def test_bad_values_are_refused_by_click_before_the_command_runs():
    for args, word in ((["--mode", "slow"], "slow"), (["--max-items", "x"], "x"), (["--grpc-port", "many"], "many")):
        result, seen = run(args)
        assert result.exit_code == 2 and word in result.output and not seen


def test_help_shows_every_field_its_default_and_help():
    result, _ = run(["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for text in (
        "--host",
        "address to bind",
        "127.0.0.1",
        "--grpc-port",
        "50051",
        "--api-key",
        "--max-items",
        "items per request",
        "1024",
        "--timeout",
        "--verbose",
        "--no-verbose",
        "Bounds",
        "--torch-threads",
    ):
        assert text in result.output, text
    assert "--models" not in result.output and "--timeout-s" not in result.output
    assert "info" in result.output  # the command's own default for log_level


def test_layers_later_wins_and_unknown_keys_name_the_fields():
    file = {"host": "10.0.0.1", "bounds": {"max_items": 7, "timeout_s": 9.0}, "api_keys": ["a", "b"]}
    config = build(Config, file, {"bounds": {"max_items": 8}})
    assert config == Config(host="10.0.0.1", api_keys=("a", "b"), bounds=Bounds(max_items=8, timeout_s=9.0))
    with pytest.raises(ValueError, match=r"unknown Bounds field.*max_itmes; known: max_items, timeout_s"):
        build(Config, {"bounds": {"max_itmes": 3}})
    with pytest.raises(ValueError, match="max_items must be at least 1"):  # the config's own check
        build(Config, {"bounds": {"max_items": 0}})


def test_a_field_without_help_or_an_unknown_type_or_a_clash_is_an_error():
    @dataclass
    class NoHelp:
        steps: int = 3

    @dataclass
    class Odd:
        table: dict[str, int] = field(default_factory=dict, metadata={"help": "a table"})

    @dataclass
    class Twice:
        a: Bounds = field(default_factory=Bounds)
        b: Bounds = field(default_factory=Bounds)

    with pytest.raises(TypeError, match=r"NoHelp.steps has no help"):
        options(NoHelp)
    with pytest.raises(TypeError, match="field table: no option for type"):
        options(Odd)
    with pytest.raises(TypeError, match=re.escape("a.max_items and b.max_items are both --max-items")):
        options(Twice)
    kept = options(Twice, exclude=("b.max_items", "b.timeout_s", "a.timeout_s"))
    assert [o.path for o in kept] == [("a", "max_items")]
    with pytest.raises(TypeError, match=r"\['host'\] are both its own and Config's"):
        config_options(Config)(lambda given, host="x": None)


def serve_config(cls, args: list[str], env: dict[str, str]):
    """The config a server command over `cls` builds (`assay.server_cli.server_config`), with its variables."""
    from assay.server_cli import server_config

    seen: dict = {}
    app = typer.Typer()

    @app.command()
    @config_options(cls, defaults={"log_level": "info"}, env_prefix=cls.env_prefix)
    def serve(given: dict) -> None:
        seen["config"] = server_config(cls, given)

    result = CliRunner().invoke(app, args, env={cls.keys_env_var: "", **env})
    assert result.exit_code == 0, result.output
    return seen["config"]


def test_every_server_option_reads_its_variable_and_the_flag_wins():
    from assay.policy_server.config import ServerConfig as PolicyConfig
    from assay.rm_server.config import ServerConfig as RewardConfig

    env = {
        "ASSAY_RM_PORT": "9100",
        "ASSAY_RM_GRPC_PORT": "none",
        "ASSAY_RM_MAX_ITEMS": "7",  # a nested field's, by its flag
        "ASSAY_RM_MODEL_WORKERS": "false",
        "ASSAY_RM_ALLOWED_HOST": "a.example b.example",  # repeatable: separated by whitespace
        "ASSAY_RM_LOG_FORMAT": "json",
        "ASSAY_RM_ACCESS_LOG": "0",
        "ASSAY_RM_LOG_LEVEL": "DEBUG",
    }
    config = serve_config(RewardConfig, [], env)
    assert (config.port, config.grpc_port, config.limits.max_items, config.models.model_workers) == (
        9100,
        None,
        7,
        False,
    )
    assert config.allowed_hosts == ("a.example", "b.example")
    assert (config.log_format, config.access_log, config.log_level) == ("json", False, "debug")

    flags = ["--port", "9200", "--max-items", "8", "--allowed-host", "c.example", "--access-log"]
    config = serve_config(RewardConfig, flags, env)
    assert (config.port, config.limits.max_items, config.allowed_hosts, config.access_log) == (
        9200,
        8,
        ("c.example",),
        True,
    )
    assert config.grpc_port is None and config.log_format == "json"  # the variables the flags left alone

    config = serve_config(
        PolicyConfig, [], {"ASSAY_POLICY_WEIGHTS_DIR": "/w/one:/w/two", "ASSAY_POLICY_MAX_BATCH": "3"}
    )
    assert config.weights_dirs == (Path("/w/one"), Path("/w/two")) and config.batching.max_sequences == 3  # paths: `:`
    assert serve_config(PolicyConfig, [], {}) == PolicyConfig(log_level="info")  # nothing set: the defaults


def test_the_key_variables_still_add_to_the_flags_keys():
    from assay.rm_server.config import ServerConfig as RewardConfig

    a, b, c = ("k" * 16 + f"{n}:score" for n in range(3))
    config = serve_config(RewardConfig, ["--api-key", c], {"ASSAY_API_KEYS": f"{a} {b}"})
    assert config.api_keys == (a, b, c)
