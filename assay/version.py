"""`assay --version`: the installed distribution's version, and the commit when run from a checkout.

The version is the installed metadata's (`importlib.metadata`), the one pip and the wheel report. When
the package is an editable install of a git checkout (the `.git` beside the `assay/` folder), the
commit is added, with `-dirty` when tracked files differ from it: two runs that print the same line ran
the same code. A wheel has no `.git` beside it, so it prints the version alone. Light: no typer, no torch.
"""

from __future__ import annotations

import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

DISTRIBUTION = "assay"


def version_text() -> str:
    """`assay 0.1.0`, or `assay 0.1.0 (git 599db80-dirty)` from a checkout."""
    try:
        text = f"{DISTRIBUTION} {version(DISTRIBUTION)}"
    except PackageNotFoundError:  # imported from a source tree that was never installed
        text = f"{DISTRIBUTION} (not installed)"
    commit = _checkout_commit(Path(__file__).resolve().parent.parent)
    return f"{text} (git {commit})" if commit else text


def _checkout_commit(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        done = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):  # no git on this machine: the version alone is still true
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None
