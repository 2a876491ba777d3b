"""Run mypy on the `assay` package as it is installed: `python tools/typecheck.py [mypy options]` (`make lint`).

The repository keeps one folder per piece (`clients/`, `search/`, ...) and setuptools' package-dir maps each
under `assay` (`clients/` is `assay.clients`). Python finds them through the editable install's import hook,
which mypy does not run, and mypy has no package-dir of its own: it finds a module only where its dotted name
is a path. So this script lays that path out as a tree of links, `build/typecheck/assay/` (the `assay/`
folder's entries, and one link per mapped folder, read from pyproject.toml so the two cannot drift), points
mypy there (`mypy_path` in pyproject.toml), and prints mypy's report with each path as the repository names
it (`clients/reward.py`, not `build/typecheck/assay/clients/reward.py`), so editors and people find the file.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tomllib
from pathlib import Path

from mypy import api

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "typecheck"


def link_tree(root: Path = ROOT, tree: Path = TREE) -> None:
    """(Re)build `tree/assay/...` as links to the folders that pyproject's package-dir maps under `assay`."""
    package_dir: dict[str, str] = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"
    ]
    shutil.rmtree(tree, ignore_errors=True)
    top = tree / "assay"
    top.mkdir(parents=True)
    for entry in (root / package_dir["assay"]).iterdir():  # `assay/` itself: link what it holds
        if entry.name != "__pycache__":
            (top / entry.name).symlink_to(entry)
    for name, folder in package_dir.items():
        if name != "assay":  # assay.clients -> clients/
            (tree / name.replace(".", "/")).symlink_to(root / folder, target_is_directory=True)


def repository_paths(report: str, root: Path = ROOT, tree: Path = TREE) -> str:
    """Rewrite each `build/typecheck/assay/...` path at a line's start to the file's path in the repository."""
    prefix = re.escape(str(tree.relative_to(root)) + "/")

    def real(match: re.Match[str]) -> str:
        return str((root / match.group(0)).resolve().relative_to(root))

    return re.sub(rf"^{prefix}\S+?\.pyi?(?=:)", real, report, flags=re.MULTILINE)


def main(argv: list[str]) -> int:
    link_tree()
    os.chdir(ROOT)  # mypy reports paths relative to where it runs; pyproject.toml (its configuration) is here
    stdout, stderr, status = api.run(argv)
    sys.stdout.write(repository_paths(stdout))
    sys.stderr.write(repository_paths(stderr))
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
