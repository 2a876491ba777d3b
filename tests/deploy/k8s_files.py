"""The Kubernetes files of deploy/k8s as the cluster would get them, for tests/deploy/test_k8s*.py.

`kustomize(folder)` builds a kustomization as `kubectl apply -k` does for the features these files use: its
`resources` (files, and folders holding a kustomization) and its `patches` (RFC 6902 JSON patches, applied with
the jsonpatch library to the one object their target names). Kustomize itself is not run (no binary here);
an overlay using anything else is refused, so a feature this reading does not know cannot slip through.

`crd_validator(name)` reads a CustomResourceDefinition's openAPIV3Schema vendored under schemas/ and makes it
strict as the API server's strict field validation (`kubectl apply --validate=strict`) is: an object schema with
`properties` refuses a field it does not list, unless it says `x-kubernetes-preserve-unknown-fields`.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
from pathlib import Path
from typing import Any

import jsonpatch
import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"  # both services on CPU; the overlays gpu/ and queue-depth/ patch it
SCHEMAS = Path(__file__).resolve().parent / "schemas"

Obj = dict[str, Any]


def documents(path: Path) -> list[Any]:
    """Every YAML document of `path`, empty ones left out."""
    return parse_documents(path.read_text())


def parse_documents(text: str) -> list[Any]:
    """Every YAML document of `text` (a file's, or `kubectl kustomize`'s output), empty ones left out."""
    return [d for d in yaml.safe_load_all(text) if d is not None]


def kustomize(folder: Path) -> list[Obj]:
    """The objects `kubectl apply -k folder` would send (see the module docstring)."""
    k = yaml.safe_load((folder / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "patches"}
    assert not unknown, f"{folder}/kustomization.yaml uses {unknown}, which this reading of kustomize does not apply"
    objects: list[Obj] = []
    for entry in k["resources"]:
        path = (folder / entry).resolve()
        objects += kustomize(path) if path.is_dir() else documents(path)
    for patch in k.get("patches", []):
        target = patch["target"]
        matches = [o for o in objects if _targets(target, o)]
        assert len(matches) == 1, (
            f"{folder}: patch {patch['path']} targets {target}, which names {len(matches)} objects"
        )
        ops = yaml.safe_load((folder / patch["path"]).read_text())
        patched = jsonpatch.JsonPatch(ops).apply(matches[0])
        objects[objects.index(matches[0])] = patched
    return objects


def _targets(target: dict[str, str], obj: Obj) -> bool:
    group, _, version = obj["apiVersion"].rpartition("/")
    return (
        target["kind"] == obj["kind"]
        and target["name"] == obj["metadata"]["name"]
        and target.get("group", group) == group
        and target.get("version", version) == version
    )


def crd_validator(filename: str) -> jsonschema.protocols.Validator:
    """A validator of the vendored CRD schema `schemas/<filename>`, strict about unknown fields."""
    schema = json.loads((SCHEMAS / filename).read_text())
    return jsonschema.Draft202012Validator(_strict(schema))


def _strict(node: Any) -> Any:
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    open_ended = "additionalProperties" in out or out.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in out and not open_ended:
        out["additionalProperties"] = False
    return out


def by_kind(objects: list[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: list[Obj], kind: str, name: str) -> Obj:
    (obj,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a label selector's `matchLabels` (or a Service's selector) picks an object with `labels`."""
    return bool(selector) and selector.items() <= labels.items()


def flag(args: list[str], name: str) -> str:
    """The value after `name` in a command line."""
    assert args.count(name) == 1, f"{name} appears {args.count(name)} times in {args}"
    return args[args.index(name) + 1]


def secret_command() -> tuple[str, dict[str, str]]:
    """The Secret's name and its keys' values, as deploy/k8s/README.md's `kubectl create secret generic` creates
    them, with the shell variables the README sets before it (`RM_KEY=$(openssl rand -hex 16)`) given fresh values
    of that form."""
    text = (K8S / "README.md").read_text()
    start = text.index("kubectl create secret generic")
    made = {name: secrets.token_hex(16) for name in re.findall(r"(\w+)=\$\(openssl rand -hex 16\)", text[:start])}
    words = shlex.split(text[start : text.index("```", start)].replace("\\\n", " "))
    values = dict(w.removeprefix("--from-literal=").split("=", 1) for w in words if w.startswith("--from-literal="))
    return words[4], {k: re.sub(r"\$(\w+)", lambda m: made[m[1]], v) for k, v in values.items()}


def secret_refs(container: Obj) -> dict[str, tuple[str, str]]:
    """The container's variables read from a Secret: name -> (Secret, key)."""
    refs = {}
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None:
            refs[var["name"]] = (ref["name"], ref["key"])
    return refs
