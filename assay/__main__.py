"""`assay` and `python -m assay`: the command line, or one sentence saying what it needs installed.

`pip install assay` alone is the light client (no typer, torch or fastapi), and its `assay` script
must not end in a traceback: it says to install the `serve` extra instead (`--version` it answers).
"""

from __future__ import annotations

import sys

# What `assay.cli` imports at start that only the extras install (the rest loads lazily, per command).
EXTRA_PACKAGES = frozenset({"typer", "rich", "click", "yaml", "torch", "transformers", "fastapi", "uvicorn"})


def main() -> None:
    if sys.argv[1:] in (["--version"], ["-V"]):  # the light install answers it too
        from assay.version import version_text

        print(version_text())
        return
    try:
        from assay.cli import app
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in EXTRA_PACKAGES:
            raise
        sys.exit(
            f"assay: the command line needs {exc.name}, which the light install leaves out: "
            "pip install 'assay[serve]' (or 'assay[all]')"
        )
    app()


if __name__ == "__main__":
    main()
