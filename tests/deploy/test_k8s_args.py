"""What the containers of deploy/k8s are told, read by the real code that will read it in the cluster.

Each Deployment's command line is parsed by the real `assay rm serve` / `assay policy serve` command (typer's
click command: every flag must exist and every value parse), with the container's environment as the Secret
the README's `kubectl create secret` command makes (fresh keys of the documented form), and built into the
service's config with the command line's own checks (keys of 16 characters and known scopes, a public bind
only with keys); nothing is served. The policy server's key at rm_server must be one rm_server accepts for
scoring. The RayService's applications are built by `assay.deploy.ray_serve`'s own builders from their
`import_path` and `args` (a Ray Serve application object: Ray is not started). The queue-depth HPAs name the
metrics prometheus-adapter serves, and those are series the services' own metrics registries write.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import typer
import yaml
from prometheus_client.parser import text_string_to_metric_families

from assay.base.auth import ApiKeys
from assay.cli import app as assay_app
from assay.cli_options import GIVEN, options
from assay.policy_server.config import ServerConfig as PolicyConfig
from assay.policy_server.http_api import SCOPES as POLICY_SCOPES
from assay.policy_server.metrics import Metrics as PolicyMetrics
from assay.rm_server.config import ServerConfig as RewardConfig
from assay.rm_server.metrics import Metrics as RewardMetrics
from assay.rm_server.spec import check_devices, load_spec
from assay.server_cli import server_config
from tests.deploy.k8s_files import (
    BASE,
    K8S,
    by_kind,
    documents,
    flag,
    kustomize,
    named,
    secret_command,
    secret_refs,
    selects,
)

pytestmark = pytest.mark.unit

COMMANDS = {"rm": RewardConfig, "policy": PolicyConfig}
BUILDS = {"cpu": BASE, "gpu": K8S / "gpu"}
PACKAGE = Path(importlib.import_module("assay.arith").__file__).parent.parent  # what the images link at /opt/assay


@pytest.fixture
def secret(monkeypatch):
    """The Secret's values, and none of the services' variables left from the environment the tests run in."""
    for cls in COMMANDS.values():
        for o in options(cls, env_prefix=cls.env_prefix):
            if o.parameter.default.envvar:
                monkeypatch.delenv(o.parameter.default.envvar, raising=False)
        monkeypatch.delenv(cls.keys_env_var, raising=False)
    return secret_command()


def container_env(monkeypatch, container: dict, secret: tuple[str, dict[str, str]]) -> None:
    """Set the container's variables here: its plain values, and its Secret references from `secret`."""
    name, values = secret
    for var in container.get("env", []):
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])
    for var, (ref, key) in secret_refs(container).items():
        assert ref == name
        monkeypatch.setenv(var, values[key])


def mounted_args(container: dict, objects: list[dict], tmp_path: Path) -> list[str]:
    """The container's args with each ConfigMap it mounts written under `tmp_path` and the mount path changed to
    that folder; `/opt/assay` in the files (the installed package, in the images) becomes this install's."""
    pod = next(
        d["spec"]["template"]["spec"]
        for d in by_kind(objects, "Deployment")
        if container in d["spec"]["template"]["spec"]["containers"]
    )
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    args = list(container["args"])
    for mount in container.get("volumeMounts", []):
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        folder = tmp_path / mount["name"]
        folder.mkdir()
        for name, text in named(objects, "ConfigMap", source["name"])["data"].items():
            (folder / name).write_text(text.replace("/opt/assay/", f"{PACKAGE}/"))
        args = [a.replace(mount["mountPath"], str(folder)) for a in args]
    return args


def served_config(args: list[str]):
    """The config `assay <args>` would serve with: the command's own parse and checks, then what serve_cmd
    checks before its server starts."""
    service, verb, *rest = args
    assert verb == "serve"
    cls = COMMANDS[service]
    assay = typer.main.get_command(assay_app)
    command = assay.commands[service].commands["serve"]  # type: ignore[attr-defined]
    ctx = command.make_context("serve", list(rest))
    given: dict = {}
    for o in options(cls, defaults={"log_level": "info"}, env_prefix=cls.env_prefix):
        source = ctx.get_parameter_source(o.name)
        if o.path == ("log_level",) or (source is not None and source.name in GIVEN):
            value = ctx.params[o.name]
            node = given
            for key in o.path[:-1]:
                node = node.setdefault(key, {})
            node[o.path[-1]] = tuple(value) if isinstance(value, list) else value
    config = server_config(cls, given)  # exits (SystemExit 2) on what the command would refuse
    if service == "rm":
        check_devices(load_spec(config.spec))
    return config, ctx.params


@pytest.mark.parametrize(("build", "deployment"), [(b, d) for b in BUILDS for d in ("assay-rm", "assay-policy")])
def test_command_lines_parse_with_the_real_cli(build, deployment, secret, monkeypatch, tmp_path):
    objects = kustomize(BUILDS[build])
    (container,) = named(objects, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    container_env(monkeypatch, container, secret)
    config, params = served_config(mounted_args(container, objects, tmp_path))
    assert config.host == "0.0.0.0" and config.api_keys  # beyond loopback, with keys from the Secret
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (config.port, config.grpc_port) == (ports["http"], ports["grpc"])
    assert config.connections.drain_timeout_s == float(flag(container["args"], "--drain-timeout"))
    assert config.log_format == "json"
    threads = config.models.torch_threads if isinstance(config, RewardConfig) else params["torch_threads"]
    if isinstance(config, PolicyConfig) and config.backend == "vllm":
        assert threads is None  # vLLM's own workers
    else:
        # torch's default counts the node's cores; the pod has its CPU request
        assert threads <= int(container["resources"]["requests"]["cpu"])


def test_the_parse_refuses_what_the_command_refuses(secret, monkeypatch, tmp_path):
    """Not a formality: a misspelt flag, or the Secret's keys missing, stops the command as it would in the pod."""
    objects = kustomize(BASE)
    (container,) = named(objects, "Deployment", "assay-rm")["spec"]["template"]["spec"]["containers"]
    args = mounted_args(container, objects, tmp_path)
    with pytest.raises(Exception, match="No such option: --torch-thread"):  # click's, vendored by typer
        served_config([a.replace("--torch-threads", "--torch-thread") for a in args])
    with pytest.raises(SystemExit):  # keyless beyond loopback
        served_config(args)
    container_env(monkeypatch, container, secret)
    served_config(args)


def test_each_service_reaches_the_other_with_a_key_it_accepts(secret, monkeypatch, tmp_path):
    """The policy server scores /v1/search at rm_server's Service; rm_server's judge asks the policy's verifier."""
    objects = kustomize(BASE)
    (rm,) = named(objects, "Deployment", "assay-rm")["spec"]["template"]["spec"]["containers"]
    (policy,) = named(objects, "Deployment", "assay-policy")["spec"]["template"]["spec"]["containers"]
    container_env(monkeypatch, rm, secret)
    rm_config, _ = served_config(mounted_args(rm, objects, tmp_path))
    spec = load_spec(rm_config.spec)
    models = [name for name, r in spec.rewards.items() if r.type.startswith("model.")]
    assert models and all(spec.model_path(name).is_dir() for name in models)  # the checkpoints the image ships
    judges = [r for r in spec.rewards.values() if r.type == "judge"]
    assert judges
    judge_keys = {r.api_key_env: os.environ[r.api_key_env] for r in judges}
    container_env(monkeypatch, policy, secret)
    policy_config, _ = served_config(policy["args"])
    url = urlsplit(policy_config.rm_url)
    service = named(objects, "Service", url.hostname)
    rm_pods = named(objects, "Deployment", "assay-rm")["spec"]["template"]["metadata"]["labels"]
    assert selects(service["spec"]["selector"], rm_pods)
    assert url.port in {p["port"] for p in service["spec"]["ports"] if p["name"] == "http"}
    assert policy_config.rm_api_key is not None
    keys = ApiKeys(rm_config.api_keys)
    keys.check(f"Bearer {policy_config.rm_api_key}", "score")  # raises unless rm_server lets it score
    policy_keys = ApiKeys(policy_config.api_keys, POLICY_SCOPES)
    policy_service = named(objects, "Service", "assay-policy")
    for judge in judges:
        url = urlsplit(judge.endpoint)
        assert url.hostname == "assay-policy" and url.port in {p["port"] for p in policy_service["spec"]["ports"]}
        policy_keys.check(f"Bearer {judge_keys[judge.api_key_env]}", "generate")


def test_queue_depth_hpas_name_metrics_the_servers_export():
    rules = yaml.safe_load((K8S / "queue-depth/prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"]: r for r in rules}
    hpas = by_kind(kustomize(K8S / "queue-depth"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for h in hpas for m in h["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == set(served) == {"assay_rm_queue_depth", "assay_policy_queue_depth"}
    # the series the servers' own registries write (`render`, what /metrics answers), one reward or model queued
    exported = set()
    for metrics, label in ((RewardMetrics(["orm"]), "orm"), (PolicyMetrics(), "policy")):
        body, _ = metrics.render({label: 3})
        exported |= {s.name for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    for name, rule in served.items():
        series = rule["seriesQuery"].split("{")[0]
        assert series in exported and rule["name"]["matches"] == f"^{series}$", name
        # the adapter's labels are the ones the Prometheus Operator adds to what it scrapes
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}


def test_the_rayservice_applications_build_with_the_real_builders(secret, monkeypatch, tmp_path):
    from ray import serve

    files = documents(K8S / "rayservice.yaml")
    ray = named(files, "RayService", "assay-ray")
    cluster = ray["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == importlib.import_module("ray").__version__
    assert cluster["authOptions"] == {"mode": "token"}
    assert "serviceType" not in cluster["headGroupSpec"]  # ClusterIP: the dashboard stays in the cluster
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    container_env(monkeypatch, head, secret)  # the builders read the keys where they run
    apps = {a["name"]: a for a in yaml.safe_load(ray["spec"]["serveConfigV2"])["applications"]}
    # the spec's ConfigMap, mounted on every Ray pod, written here as a file with this install's checkpoints
    (mount,) = head["volumeMounts"]
    (volume,) = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
    assert mount["name"] == volume["name"]
    for name, text in named(files, "ConfigMap", volume["configMap"]["name"])["data"].items():
        (tmp_path / name).write_text(text.replace("/opt/assay/", f"{PACKAGE}/"))
    apps["rm"]["args"]["spec"] = apps["rm"]["args"]["spec"].replace(mount["mountPath"], str(tmp_path))
    assert {a["import_path"] for a in apps.values()} == {
        "assay.deploy.ray_serve:rm_app",
        "assay.deploy.ray_serve:policy_app",
    }
    for app in apps.values():
        module, _, name = app["import_path"].partition(":")
        builder = getattr(importlib.import_module(module), name)
        args = {k: str(v) for k, v in app["args"].items()}  # as `serve run ... key=value` and a config file give them
        assert isinstance(builder(app["args"]), serve.Application), app["name"]
        assert isinstance(builder(args), serve.Application), app["name"]
    # what the replicas serve with: keys from the Secret (public proxy), and the policy's key at rm_server
    from assay.deploy.app_args import policy_args, rm_args

    rm_config, _ = rm_args(apps["rm"]["args"])
    policy_config, _ = policy_args(apps["policy"]["args"])
    assert rm_config.api_keys and policy_config.api_keys
    ApiKeys(rm_config.api_keys).check(f"Bearer {policy_config.rm_api_key}", "score")
    spec = load_spec(rm_config.spec)
    assert all(spec.model_path(n).is_dir() for n, r in spec.rewards.items() if r.type.startswith("model."))
    for judge in (r for r in spec.rewards.values() if r.type == "judge"):  # asks the policy app, with a key it takes
        assert judge.endpoint == f"http://{ray['metadata']['name']}-serve-svc:8000{apps['policy']['route_prefix']}/v1"
        ApiKeys(policy_config.api_keys, POLICY_SCOPES).check(f"Bearer {os.environ[judge.api_key_env]}", "generate")
    # the policy scores through the Serve Service KubeRay makes for this RayService, at the rm app's prefix
    rm_url = urlsplit(apps["policy"]["args"]["rm_url"])
    assert (rm_url.hostname, rm_url.port) == (f"{ray['metadata']['name']}-serve-svc", 8000)
    assert rm_url.path == apps["rm"]["route_prefix"]
    # a replica that asks for a GPU has a worker group that has one
    gpus = {
        g["groupName"]: g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)
        for g in cluster["workerGroupSpecs"]
    }
    for app in apps.values():
        if float(app["args"].get("num_gpus", 0)) > 0:
            assert max(gpus.values()) >= float(app["args"]["num_gpus"])
