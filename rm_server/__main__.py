"""`python -m assay.rm_server [options]` is `assay rm serve [options]`."""

import typer

from assay.rm_server.cli import serve_cmd

if __name__ == "__main__":
    typer.run(serve_cmd)
