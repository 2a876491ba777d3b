"""`assay rm ...`: serve rewards, and probe them for non-content biases."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

rm_app = typer.Typer(help="The reward service.", no_args_is_help=True)
console = Console(stderr=True)


@rm_app.command("serve")
def serve_cmd(
    spec: Path = typer.Option(None, help="reward spec YAML (default: the embedded arithmetic world's rewards)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback API keys are required"),
    port: int = typer.Option(8000, help="HTTP port"),
    grpc_port: int = typer.Option(50051, help="gRPC port (-1: no gRPC)"),
    api_key: list[str] = typer.Option([], help="KEY:scope[,scope] (scopes: score, admin); repeatable"),
    max_items: int = typer.Option(1024, help="items per request"),
    max_body_mb: float = typer.Option(8.0, help="request body limit, MiB"),
    log_level: str = typer.Option("info", help="uvicorn/server log level"),
) -> None:
    """Serve rewards over HTTP and gRPC until interrupted."""
    from rm_server.server import InsecureBinding, ServerConfig, serve
    from rm_server.serving import Limits
    from rm_server.spec import SpecError

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig(
        spec=spec,
        host=host,
        port=port,
        grpc_port=None if grpc_port < 0 else grpc_port,
        api_keys=tuple(api_key),
        limits=Limits(max_items=max_items, max_body_bytes=int(max_body_mb * 1024 * 1024)),
        log_level=log_level,
    )
    try:
        asyncio.run(serve(config))
    except (SpecError, InsecureBinding, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass
