"""`assay policy ...`: serve the policy model(s) behind an OpenAI-compatible API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

policy_app = typer.Typer(help="The policy (generation) service.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # an error naming a long path stays one line


@policy_app.command("serve")
def serve_cmd(
    model: Path = typer.Option(
        None, help="checkpoint directory (default: the embedded policy as `policy`, and the verifier as `verifier`)"
    ),
    model_name: str = typer.Option("policy", help="the name --model is served under (the `model` of requests)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback API keys are required"),
    port: int = typer.Option(8001, help="HTTP port"),
    api_key: list[str] = typer.Option(
        [], help="KEY:scope[,scope] (scopes: generate, admin); repeatable. ASSAY_POLICY_API_KEYS "
        "(space-separated) is the safer way: a command line is visible to every user of the machine"
    ),
    max_n: int = typer.Option(128, help="completions per prompt (n)"),
    max_tokens: int = typer.Option(4096, help="tokens per completion (the model's context caps it too)"),
    max_prompt_tokens: int = typer.Option(None, help="prompt tokens (default: the model's context length)"),
    max_body_mb: float = typer.Option(4.0, help="request body limit, MiB"),
    max_batch: int = typer.Option(64, help="sequences per decode batch"),
    max_queue: int = typer.Option(4096, help="sequences waiting; beyond this requests get 429"),
    timeout_s: float = typer.Option(300.0, help="a request still generating after this gets 504"),
    torch_threads: int = typer.Option(
        None, help="torch intra-op threads (default: torch's). Each model decodes on its own thread: with "
        "small models on few cores, 1 avoids threads spinning against each other"
    ),
    log_level: str = typer.Option("info", help="uvicorn/server log level"),
) -> None:
    """Serve generation over HTTP until interrupted."""
    from assay.checkpoints import CheckpointError
    from policy_server.backends.hf import BatchSettings
    from policy_server.server import InsecureBinding, ServerConfig, serve
    from policy_server.serving import Limits
    from rm_server.cli import run_loop

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        config = ServerConfig(
            models={model_name: model} if model is not None else None,
            host=host,
            port=port,
            api_keys=tuple(api_key),
            limits=Limits(
                max_n=max_n, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                max_body_bytes=int(max_body_mb * 1024 * 1024), max_sequences=min(1024, max_queue), timeout_s=timeout_s,
            ),
            batching=BatchSettings(max_sequences=max_batch, max_queue=max_queue),
            log_level=log_level,
        )
        run_loop(serve(config))
    except (CheckpointError, InsecureBinding, ValueError, OSError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass
