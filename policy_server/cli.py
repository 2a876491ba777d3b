"""`assay policy ...`: serve the policy model(s) behind an OpenAI-compatible API; `assay search`.

`assay policy serve`'s options are `ServerConfig`'s fields (`assay.policy_server.config`), derived with
their defaults and help by `assay.cli_options`, plus `--model`/`--model-name` (one served model) and
`--torch-threads` (the process's, not the server's). The config and the paths it names are checked
before the server stack is imported (`assay.server_cli`), so a refusal takes no torch or fastapi import.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console, JustifyMethod

from assay.cli_options import config_options
from assay.policy_server.config import ServerConfig
from assay.server_cli import refuse, run, server_config, setup_logging

policy_app = typer.Typer(help="The policy (generation) service.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # an error naming a long path stays one line


@policy_app.command("serve")
@config_options(ServerConfig, defaults={"log_level": "info"}, env_prefix=ServerConfig.env_prefix)
def serve_cmd(
    given: dict,
    model: Path = typer.Option(
        None,
        envvar="ASSAY_POLICY_MODEL",
        help="checkpoint directory (default: the embedded policy as `policy`, and the verifier as `verifier`)",
    ),
    model_name: str = typer.Option(
        "policy", envvar="ASSAY_POLICY_MODEL_NAME", help="the name --model is served under (the `model` of requests)"
    ),
    torch_threads: int = typer.Option(
        None,
        envvar="ASSAY_POLICY_TORCH_THREADS",
        help="torch intra-op threads (default: torch's). Each model decodes on its own thread: with "
        "small models on few cores, 1 avoids threads spinning against each other",
    ),
) -> None:
    """Serve generation (and search, scored by rm_server) over HTTP, and gRPC with --grpc-port, until interrupted."""
    from assay.policy_server.weight_paths import weight_roots

    config = server_config(ServerConfig, given, {"models": {model_name: model}} if model is not None else {})
    try:  # what needs the disk, before the server stack is imported
        for path in (config.models or {}).values():
            if not path.is_dir():
                raise ValueError(f"{path}: no such checkpoint directory.")
        weight_roots(config.weights_dirs)
        if config.device != "cpu":  # torch is imported only to check a device that is not the CPU
            from assay.checkpoints import check_device

            check_device(config.device)
    except ValueError as exc:
        refuse(exc)
    setup_logging(config)
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    from assay.checkpoints import CheckpointError
    from assay.policy_server.server import serve

    run(serve, config, refused=(CheckpointError, ValueError, OSError, ImportError))


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
        None,
        help="the rm_server reward (default: prm for beam_search, dvts and refine, orm otherwise; majority uses none)",
    ),
    reference: str = typer.Option(None, help="the known answer: marks each candidate correct or not"),
    chat: bool = typer.Option(
        False, "--chat", help="send PROMPT as one user message: the policy's chat template renders it"
    ),
    answer: str = typer.Option(
        None, help="how final answers are found: hashes (#### n, the default), boxed, last_number, regex"
    ),
    answer_pattern: str = typer.Option(None, help="with --answer regex: the pattern whose group 1 is the answer"),
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
    extraction = {"how": answer or ("regex" if answer_pattern else "hashes"), "pattern": answer_pattern}
    body = {
        **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt}),
        **({"answer": extraction} if answer or answer_pattern else {}),
        "strategy": strategy,
        "n": n,
        "model": model,
        **{k: v for k, v in {"reward": reward, "reference": reference, **config}.items() if v is not None},
        **({"budget": budget} if any(v is not None for v in budget.values()) else {}),
    }
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
    if res.prompt is not None:  # the chat template's rendering of the messages sent
        out.print(f"[bold]rendered prompt:[/bold] {res.prompt!r}")
    out.print(f"[bold]text:[/bold] {res.text!r}")
    order = sorted(
        range(len(res.candidates)), key=lambda i: (res.candidates[i].score is None, -(res.candidates[i].score or 0.0))
    )
    table = Table(title=f"candidates (best {min(show, len(order))} of {len(order)})" if order else "no candidates")
    columns: tuple[tuple[str, JustifyMethod], ...] = (
        ("#", "right"),
        ("score", "right"),
        ("answer", "right"),
        ("correct", "center"),
        ("tokens", "right"),
        ("finish", "left"),
        ("text", "left"),
    )
    for name, justify in columns:
        table.add_column(name, justify=justify)
    for i in order[:show]:
        c = res.candidates[i]
        score = f"{c.score:.4f}" if c.score is not None else f"[red]{c.error or 'none'}[/red]"
        correct = "" if c.correct is None else ("[green]yes[/green]" if c.correct else "[red]no[/red]")
        mark = "*" if i == res.chosen else ""
        table.add_row(f"{mark}{i}", score, c.final_answer or "", correct, str(c.num_tokens), c.finish_reason, c.text)
    out.print(table)
    u = res.usage
    reward = f"reward {res.reward} ({res.reward_id})" if res.reward_id else "no reward"
    out.print(
        f"usage: {u.generated_tokens} tokens, {u.candidates} sequences, {u.generate_calls} generate calls, "
        f"{u.reward_calls} reward calls ({u.scored_items} items); {reward}; weight_version "
        f"{res.weight_version}; seed {res.seed}; {elapsed_s:.2f}s"
    )
