"""`python -m assay.policy_server [options]` is `assay policy serve [options]`."""

import typer

from assay.policy_server.cli import serve_cmd

if __name__ == "__main__":
    typer.run(serve_cmd)
