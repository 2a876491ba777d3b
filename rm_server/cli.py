"""`assay rm ...`: serve rewards, and probe them for non-content biases.

`assay rm serve`'s options are `ServerConfig`'s fields (`assay.rm_server.config`), derived with their
defaults and help by `assay.cli_options`; the config and the spec are checked before the server
stack is imported (`assay.server_cli`), so a refusal takes no torch or fastapi import.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from assay.cli_options import config_options
from assay.rm_server.config import ServerConfig
from assay.server_cli import refuse, run, server_config, setup_logging

rm_app = typer.Typer(help="The reward service.", no_args_is_help=True)


@rm_app.command("serve")
@config_options(ServerConfig, defaults={"log_level": "info"})
def serve_cmd(given: dict) -> None:
    """Serve rewards over HTTP and gRPC until interrupted."""
    from assay.rm_server.spec import SpecError, load_spec

    config = server_config(ServerConfig, given)
    try:
        load_spec(config.spec)  # a spec that cannot serve is refused before the server stack is imported
    except (SpecError, OSError) as exc:
        refuse(exc)
    setup_logging(config)
    from assay.rm_server.server import serve

    run(serve, config, refused=(SpecError, ValueError, OSError))


@rm_app.command("probe")
def probe_cmd(
    spec: Path = typer.Option(None, help="reward spec YAML (default: the embedded arithmetic world's rewards)"),
    reward: list[str] = typer.Option([], help="reward to probe; repeatable (default: every pointwise reward)"),
    problems: int = typer.Option(64, help="held-out problems (each gives a right and a wrong solution)"),
) -> None:
    """Perturb responses with non-content features and report how much each moves each reward."""
    from rich.table import Table

    from assay.rm_server.probe import PERTURBATIONS, probe_spec
    from assay.rm_server.spec import SpecError

    try:
        table, ids = probe_spec(spec, list(reward) or None, problems)
    except (SpecError, ValueError) as exc:
        refuse(exc)
    out = Table(
        title=f"Mean score change under each perturbation ({2 * problems} responses); "
        "in brackets: the change over the reward's spread (std) on the originals"
    )
    out.add_column("perturbation")
    for name in table:
        out.add_column(name, justify="right")
    for p in PERTURBATIONS:
        cells = []
        for name in table:
            c = table[name][p]
            if c.scored == 0:
                cells.append("[dim]failed[/dim]")
                continue
            flag = "[red]" if abs(c.mean_delta) > 1e-6 and (c.effect is None or abs(c.effect) >= 0.5) else ""
            effect = "" if c.effect is None else f" ({c.effect:+.2f})"
            cells.append(f"{flag}{c.mean_delta:+.3f}{effect}" + (f" [dim]{c.failed} failed[/dim]" if c.failed else ""))
        out.add_row(p, *cells)
    wide = Console(width=max(Console().width, 40 + 22 * len(table)))
    wide.print(out)
    for name, rid in ids.items():
        wide.print(f"[dim]{name}: {rid}[/dim]")
