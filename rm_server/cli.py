"""`assay rm ...`: serve rewards, and probe them for non-content biases."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from assay.base.connections import Connections

rm_app = typer.Typer(help="The reward service.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # an error sentence stays one line


@rm_app.command("serve")
def serve_cmd(
    spec: Path = typer.Option(None, help="reward spec YAML (default: the embedded arithmetic world's rewards)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback API keys are required"),
    port: int = typer.Option(8000, help="HTTP port"),
    grpc_port: int = typer.Option(50051, help="gRPC port (-1: no gRPC)"),
    api_key: list[str] = typer.Option(
        [], help="KEY:scope[,scope] (scopes: score, admin); repeatable. ASSAY_API_KEYS (space-separated) "
        "is the safer way: a command line is visible to every user of the machine"
    ),
    allowed_host: list[str] = typer.Option(
        [], help="a Host name clients reach this server by (e.g. api.example.com, *.example.com); repeatable. "
        "Others are refused (DNS rebinding); default: loopback names on a loopback bind, any beyond it"
    ),
    max_items: int = typer.Option(1024, help="items per request"),
    max_body_mb: float = typer.Option(8.0, help="request body limit, MiB"),
    max_connections: int = typer.Option(Connections.max_connections, help="HTTP connections open at once; "
                                        "past it a new one is answered 503 and closed"),
    header_timeout: float = typer.Option(Connections.header_timeout_s, help="seconds for a request's headers "
                                         "to arrive (from connect, or a kept-alive connection's next byte)"),
    body_timeout: float = typer.Option(Connections.body_timeout_s, help="seconds for a request's body to "
                                       "arrive after its headers (else 408); uploads included"),
    idle_timeout: float = typer.Option(Connections.idle_timeout_s, help="keep-alive: seconds an idle "
                                       "connection is kept after a response"),
    drain_timeout: float = typer.Option(Connections.drain_timeout_s, help="on SIGTERM: seconds in-flight "
                                        "requests may take to finish; what still runs then gets a retryable 503"),
    log_level: str = typer.Option("info", help="uvicorn/server log level"),
) -> None:
    """Serve rewards over HTTP and gRPC until interrupted."""
    from assay.base.serve import InsecureBinding, run_loop
    from assay.rm_server.server import ServerConfig, serve
    from assay.rm_server.serving import Limits
    from assay.rm_server.spec import SpecError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        config = ServerConfig(
            spec=spec,
            host=host,
            port=port,
            grpc_port=None if grpc_port < 0 else grpc_port,
            api_keys=tuple(api_key),
            allowed_hosts=tuple(allowed_host),
            limits=Limits(max_items=max_items, max_body_bytes=int(max_body_mb * 1024 * 1024)),
            connections=Connections(max_connections=max_connections, header_timeout_s=header_timeout,
                                    body_timeout_s=body_timeout, idle_timeout_s=idle_timeout,
                                    drain_timeout_s=drain_timeout),  # fmt: skip
            log_level=log_level,
        )
        run_loop(serve(config))
    except (SpecError, InsecureBinding, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


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
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    out = Table(title=f"Mean score change under each perturbation ({2 * problems} responses); "
                      "in brackets: the change over the reward's spread (std) on the originals")
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
