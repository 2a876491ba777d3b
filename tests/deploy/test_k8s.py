"""deploy/k8s against the Kubernetes API's schemas and the CRDs' schemas, and wired together, offline.

Every object, as `kubectl apply -f` or `-k` would send it (the overlays built by `k8s_files.kustomize`), validates
with kubernetes-validate's strict schemas (unknown fields refused) for Kubernetes 1.32 and for the newest the
package ships (1.37 with kubernetes-validate 1.37.0); the ServiceMonitors and the RayService, which those schemas
do not know, validate against their CRDs' openAPIV3Schema vendored from prometheus-operator and KubeRay
(schemas/README.md: where from, which commit). Then the wiring no schema checks: selectors pick the pods, probes
reach /ready and /health on the port the server listens on, the HPA, PDB and ServiceMonitor name what exists, the
drain fits in the grace period, and every Secret key read is one the documented command creates.
The command lines and the Ray Serve arguments are parsed by the real code in test_k8s_args.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.deploy.k8s_files import (
    BASE,
    K8S,
    ROOT,
    by_kind,
    crd_validator,
    documents,
    flag,
    kustomize,
    named,
    parse_documents,
    secret_command,
    secret_refs,
    selects,
)

pytestmark = pytest.mark.unit

# The oldest Kubernetes these files are for (the preStop `sleep` action is on by default from 1.30),
# and the newest kubernetes-validate has schemas of.
VERSIONS = ("1.32", kubernetes_validate.latest_version())
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
    ("ray.io/v1", "RayService"): "rayservice-ray.io-v1.json",
}
BUILDS = {"cpu": BASE, "gpu": K8S / "gpu", "queue-depth": K8S / "queue-depth"}
PLAIN_FILES = ("servicemonitor.yaml", "rayservice.yaml")  # applied with -f, once their CRDs are installed


def every_object() -> list[tuple[str, dict]]:
    """(where, object) for every object of every build and plain file."""
    found = [(f"{name}: {o['kind']}/{o['metadata']['name']}", o) for name, d in BUILDS.items() for o in kustomize(d)]
    found += [(f"{f}: {o['kind']}/{o['metadata']['name']}", o) for f in PLAIN_FILES for o in documents(K8S / f)]
    return found


OBJECTS = every_object()


def test_every_file_is_checked():
    """Each file under deploy/k8s is an object file a build or PLAIN_FILES holds, a kustomization, one's patch, or
    the prometheus-adapter values (test_k8s_args.py): nothing escapes the checks below."""
    used = {K8S / f for f in PLAIN_FILES} | {K8S / "README.md", K8S / "queue-depth/prometheus-adapter-values.yaml"}
    for folder in BUILDS.values():
        k = yaml.safe_load((folder / "kustomization.yaml").read_text())
        used |= {folder / "kustomization.yaml", *(folder / p["path"] for p in k.get("patches", []))}
        used |= {(folder / r).resolve() for r in k["resources"] if (folder / r).is_file()}
    assert {p for p in K8S.rglob("*") if p.is_file()} == used


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here (kustomize is built into it)")
@pytest.mark.parametrize("build", BUILDS)
def test_kubectl_kustomize_builds_the_same_objects(build):
    """Where kubectl is at hand, its own kustomize (offline: `kubectl kustomize` reads files only) builds each
    kustomization into exactly the objects the tests read (a reading that is not kustomize's would test other
    objects than a cluster gets; kustomize refuses, say, an overlay inside its base's folder)."""
    built = subprocess.run(
        ["kubectl", "kustomize", str(BUILDS[build])], capture_output=True, text=True, timeout=120, check=False
    )
    assert built.returncode == 0, built.stderr

    def key(o: dict) -> tuple[str, str]:
        return o["kind"], o["metadata"]["name"]

    assert sorted(parse_documents(built.stdout), key=key) == sorted(kustomize(BUILDS[build]), key=key)


@pytest.mark.parametrize("version", VERSIONS)
def test_objects_validate_against_the_kubernetes_schemas(version):
    core = [(where, o) for where, o in OBJECTS if (o["apiVersion"], o["kind"]) not in CRDS]
    assert {o["kind"] for _, o in core} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    distinct = {json.dumps(o, sort_keys=True): (where, o) for where, o in core}  # the overlays repeat most of base
    for where, obj in distinct.values():
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where}: {exc.message} at {'.'.join(map(str, exc.path))}")


def test_custom_resources_validate_against_their_crds():
    custom = [(where, o) for where, o in OBJECTS if (o["apiVersion"], o["kind"]) in CRDS]
    assert {o["kind"] for _, o in custom} == {"ServiceMonitor", "RayService"}
    for where, obj in custom:
        errors = [
            f"{e.message} at {e.json_path}"
            for e in crd_validator(CRDS[obj["apiVersion"], obj["kind"]]).iter_errors(obj)
        ]
        assert not errors, f"{where}: {errors}"


def test_the_validators_refuse_a_wrong_field():
    """Both checks are strict: a misspelt field, or a value outside an enum, fails them."""
    deployment = copy.deepcopy(named(kustomize(BASE), "Deployment", "assay-rm"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSIONS[0], strict=True)
    ray = named(documents(K8S / "rayservice.yaml"), "RayService", "assay-ray")
    validator = crd_validator(CRDS["ray.io/v1", "RayService"])
    for path, value in ((("spec", "serveConfigV3"), "x"), (("spec", "rayClusterConfig", "authOptions", "mode"), "on")):
        broken = copy.deepcopy(ray)
        node = broken
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        with pytest.raises(jsonschema.ValidationError):
            validator.validate(broken)


@pytest.mark.parametrize("build", BUILDS)
def test_services_select_the_pods_and_their_ports(build):
    objects = kustomize(BUILDS[build])
    deployments = by_kind(objects, "Deployment")
    assert {d["metadata"]["name"] for d in deployments} == {"assay-rm", "assay-policy"}
    for d in deployments:
        pods = d["spec"]["template"]["metadata"]["labels"]
        assert selects(d["spec"]["selector"]["matchLabels"], pods)
        services = [s for s in by_kind(objects, "Service") if selects(s["spec"]["selector"], pods)]
        # one Service kube-proxy balances, one headless for clients that spread over the pods themselves
        assert sorted(s["spec"].get("clusterIP", "") for s in services) == ["", "None"], d["metadata"]["name"]
        (container,) = d["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        for s in services:
            assert {p["name"] for p in s["spec"]["ports"]} == {"http", "grpc"}
            assert all(p["targetPort"] in ports for p in s["spec"]["ports"])
        args = container["args"]
        assert ports == {"http": int(flag(args, "--port")), "grpc": int(flag(args, "--grpc-port"))}
        assert flag(args, "--host") == "0.0.0.0"


@pytest.mark.parametrize("build", BUILDS)
def test_probes_drain_and_security(build):
    for d in by_kind(kustomize(BUILDS[build]), "Deployment"):
        pod = d["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        paths = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
        assert {kind: get["path"] for kind, get in paths.items()} == {
            "startupProbe": "/health",
            "readinessProbe": "/ready",
            "livenessProbe": "/health",
        }
        assert all(get["port"] == "http" for get in paths.values())
        # SIGTERM comes after preStop; the drain must end, and the process exit, before the kill
        drain = float(flag(container["args"], "--drain-timeout"))
        assert pod["terminationGracePeriodSeconds"] > container["lifecycle"]["preStop"]["sleep"]["seconds"] + drain
        assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["readOnlyRootFilesystem"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert "emptyDir" in volumes[mounts["/tmp"]]  # the forkserver's socket and torch's caches


def test_the_gpu_build_puts_the_policy_on_a_gpu():
    cpu, gpu = (named(kustomize(BUILDS[b]), "Deployment", "assay-policy") for b in ("cpu", "gpu"))
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"] == "assay:cuda"
    args = container["args"]
    assert (flag(args, "--backend"), flag(args, "--device")) == ("vllm", "cuda")
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/dev/shm", "/home/assay/.cache", "/tmp"} <= mounts
    # the rest of the pod is the CPU one's: same labels, probes, keys and Services
    assert gpu["spec"]["template"]["metadata"] == cpu["spec"]["template"]["metadata"]
    (cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
    assert secret_refs(container) == secret_refs(cpu_container)
    assert container["readinessProbe"] == cpu_container["readinessProbe"]
    assert named(kustomize(BUILDS["cpu"]), "Deployment", "assay-rm") == named(
        kustomize(BUILDS["gpu"]), "Deployment", "assay-rm"
    )


@pytest.mark.parametrize("build", BUILDS)
def test_autoscalers_and_budgets_name_the_deployments(build):
    objects = kustomize(BUILDS[build])
    for d in by_kind(objects, "Deployment"):
        name, pods = d["metadata"]["name"], d["spec"]["template"]["metadata"]["labels"]
        hpa = named(objects, "HorizontalPodAutoscaler", name)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert hpa["spec"]["minReplicas"] <= d["spec"]["replicas"] <= hpa["spec"]["maxReplicas"]
        pdb = named(objects, "PodDisruptionBudget", name)
        assert selects(pdb["spec"]["selector"]["matchLabels"], pods)
        # a budget the fewest replicas cannot meet would block every node drain
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
        cpu = [m for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
        assert cpu and all(m["resource"]["name"] == "cpu" for m in cpu)
        # utilization is counted against the request: without one the HPA has nothing to divide by
        assert "cpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]


def test_service_monitors_scrape_each_pod_once():
    objects = kustomize(BASE)
    monitors = documents(K8S / "servicemonitor.yaml")
    assert len(monitors) == 2
    for d in by_kind(objects, "Deployment"):
        pods = d["spec"]["template"]["metadata"]["labels"]
        services = [s for s in by_kind(objects, "Service") if selects(s["spec"]["selector"], pods)]
        watching = [
            (m, s)
            for m in monitors
            for s in services
            if selects(m["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
        ]
        assert len(watching) == 1, f"{d['metadata']['name']}: {len(watching)} (ServiceMonitor, Service) pairs"
        monitor, service = watching[0]
        assert service["spec"].get("clusterIP") != "None"
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"


def test_secret_keys_are_the_ones_the_documented_command_creates():
    secret, keys = secret_command()
    read = set()
    containers = [
        c for d in by_kind(kustomize(BASE), "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
    ]
    ray = named(documents(K8S / "rayservice.yaml"), "RayService", "assay-ray")
    cluster = ray["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    containers += [c for g in groups for c in g["template"]["spec"]["containers"]]
    for container in containers:
        refs = secret_refs(container)
        assert refs, f"{container['name']} reads no key"
        read |= set(refs.values())
    assert read == {(secret, key) for key in keys}


def test_the_service_addresses_the_comments_give_name_a_headless_service_and_its_port():
    """The clients' service addresses in the files' comments (`dns+http://NAME:PORT`, gRPC's `dns:///NAME:PORT`:
    a name the client resolves to every pod) name a headless Service and one of its ports, of the right kind."""
    services = {s["metadata"]["name"]: s for s in by_kind(kustomize(BASE), "Service")}
    text = "\n".join(p.read_text() for p in K8S.rglob("*.yaml")) + (K8S / "README.md").read_text()
    found = re.findall(r"(dns\+http://|dns:///)([a-z0-9-]+):(\d+)", text)
    assert {scheme for scheme, _, _ in found} == {"dns+http://", "dns:///"}
    for scheme, name, port in found:
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", name
        (kind,) = [p["name"] for p in service["spec"]["ports"] if p["port"] == int(port)]
        assert kind == ("http" if scheme == "dns+http://" else "grpc"), f"{scheme}{name}:{port}"


def test_pods_run_images_deploy_docker_builds_as_their_user():
    """Every image the manifests run is one deploy/docker's Dockerfiles say how to build (`docker build -f ... -t
    TAG`: the RayService's with the ray extra), and each pod runs as that image's own user."""
    builds = {}  # tag -> (Dockerfile, the documented build command)
    for dockerfile in (ROOT / "deploy" / "docker").glob("Dockerfile*"):
        for command in re.findall(r"docker build -f deploy/docker/\S+ .*", dockerfile.read_text()):
            builds[re.search(r"-t (\S+)", command)[1]] = (dockerfile.read_text(), command)
    ray = named(documents(K8S / "rayservice.yaml"), "RayService", "assay-ray")
    cluster = ray["spec"]["rayClusterConfig"]
    pods = [
        ("base", d["spec"]["template"]["spec"]) for b in BUILDS.values() for d in by_kind(kustomize(b), "Deployment")
    ]
    pods += [("ray", g["template"]["spec"]) for g in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])]
    for kind, pod in pods:
        for container in pod["containers"]:
            dockerfile, command = builds[container["image"]]
            user, group = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE).groups()
            context = pod["securityContext"]
            assert (context["runAsUser"], context["runAsGroup"]) == (int(user), int(group)), container["image"]
            if kind == "ray":
                assert re.search(r"EXTRAS=\S*\bray\b", command), f"{container['image']}: {command}"
