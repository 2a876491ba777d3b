"""`assay rm ...`: serve rewards, evaluate them on preference data, and probe them for non-content biases.

`assay rm serve`'s options are `ServerConfig`'s fields (`assay.rm_server.config`), derived with their
defaults and help by `assay.cli_options`; the config and the spec are checked before the server
stack is imported (`assay.server_cli`), so a refusal takes no torch or fastapi import.

`assay rm eval` (`rm_eval.py`) and `assay rm probe --items` (`probe_items.py`) score through a
`RewardClient`: of a running service (`--rm-url`), or of the spec served in this process by the
service's own serving layer (`local.LocalTransport`), so what they measure is what is served.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from assay.cli_options import config_options
from assay.rm_server.config import ServerConfig
from assay.server_cli import refuse, run, server_config, setup_logging

rm_app = typer.Typer(help="The reward service.", no_args_is_help=True)


@rm_app.command("serve")
@config_options(ServerConfig, defaults={"log_level": "info"}, env_prefix=ServerConfig.env_prefix)
def serve_cmd(given: dict) -> None:
    """Serve rewards over HTTP and gRPC until interrupted."""
    from assay.rm_server.spec import SpecError, check_devices, load_spec

    config = server_config(ServerConfig, given)
    try:  # a spec that cannot serve is refused before the server stack is imported
        check_devices(load_spec(config.spec))
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
    items: Path = typer.Option(None, help="probe your own items: prompt + response rows, or preference rows"),
    rm_url: str = typer.Option(None, help="with --items: a running reward service to probe instead of --spec"),
    api_key: str = typer.Option(None, envvar="ASSAY_API_KEY", help="key for --rm-url"),
    as_json: bool = typer.Option(False, "--json", help="with --items: print the figures as one JSON object"),
    skip_bad_rows: bool = typer.Option(False, help="with --items: skip malformed rows (counted) instead of stopping"),
    batch_size: int = typer.Option(64, min=1, help="with --items: responses per score request"),
    timeout_s: float = typer.Option(300.0, help="with --items: deadline of each score request, in seconds"),
) -> None:
    """Perturb responses with non-content features and report how much each moves each reward."""
    if items is not None:
        _probe_items(items, spec, rm_url, api_key, list(reward), as_json, skip_bad_rows, batch_size, timeout_s)
        return
    if rm_url is not None or as_json:
        refuse(ValueError("--rm-url and --json go with --items; the arithmetic probe serves --spec in-process"))
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


@rm_app.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., help="preference file: prompt + chosen + rejected, or responses + scores"),
    reward: str = typer.Option(..., help="the reward to evaluate, by its served name"),
    spec: Path = typer.Option(None, help="serve this spec in-process (default: the embedded one)"),
    rm_url: str = typer.Option(None, help="a running reward service to evaluate instead, e.g. http://127.0.0.1:8000"),
    api_key: str = typer.Option(None, envvar="ASSAY_API_KEY", help="key for --rm-url"),
    as_json: bool = typer.Option(False, "--json", help="print the report as one JSON object"),
    skip_bad_rows: bool = typer.Option(False, help="skip malformed rows (counted in the report) instead of stopping"),
    batch_size: int = typer.Option(64, min=1, help="responses per score request"),
    timeout_s: float = typer.Option(300.0, help="deadline of each score request, in seconds"),
) -> None:
    """Pairwise accuracy of a reward on preference data, scored through the service (RewardBench's figures)."""
    from assay.clients import ServiceError
    from assay.data import DataError, load_preferences
    from assay.rm_server.rm_eval import evaluate

    try:
        loaded = load_preferences(data, skip_bad_rows=skip_bad_rows)
    except (DataError, OSError) as exc:
        refuse(exc)
    try:
        with _client(spec, rm_url, api_key, [reward], timeout_s) as client, _progress() as (advance, total):
            info = {r.name: r for r in client.rewards().rewards}
            if reward in info and info[reward].needs_reference:
                refuse(ValueError(f"reward {reward!r} needs a reference, and preference rows carry none"))
            if reward in info and info[reward].pairwise:
                refuse(ValueError(f"reward {reward!r} only compares (/v1/compare); rm eval scores pointwise rewards"))
            report = evaluate(client, reward, loaded, batch_size, progress=advance, total=total)
    except ServiceError as exc:
        refuse(exc)
    if as_json:
        typer.echo(json.dumps(report.as_json()))
    else:
        Console().print(_eval_table(report.as_json()))


def _probe_items(
    path: Path,
    spec: Path | None,
    rm_url: str | None,
    api_key: str | None,
    rewards: list[str],
    as_json: bool,
    skip_bad_rows: bool,
    batch_size: int,
    timeout_s: float,
) -> None:
    """`assay rm probe --items`: the domain-agnostic probe on the file's items, through the service."""
    from assay.clients import ServiceError
    from assay.data import DataError
    from assay.rm_server.probe_items import PERTURBATIONS, load_items, probe

    try:
        items, pairs, loaded = load_items(str(path), skip_bad_rows=skip_bad_rows)
    except (DataError, OSError) as exc:
        refuse(exc)
    try:
        with _client(spec, rm_url, api_key, rewards, timeout_s) as client, _progress() as (advance, total):
            pairwise = {r.name for r in client.rewards().rewards if r.pairwise}
            if pairwise & set(rewards):
                refuse(ValueError(f"{', '.join(sorted(pairwise & set(rewards)))} only compare; the probe scores"))
            names = rewards or [r.name for r in client.rewards().rewards if r.name not in pairwise]
            total(len(items) * (1 + len(PERTURBATIONS)) * len(names))
            table, ids = probe(client, names, items, pairs, batch_size, progress=advance)
    except ServiceError as exc:
        refuse(exc)
    figures = {name: {p: vars(c) for p, c in cells.items()} for name, cells in table.items()}
    if as_json:
        out = {"items": str(path), "responses": len(items), "pairs": len(pairs), "skipped_rows": len(loaded.skipped)}
        typer.echo(json.dumps(out | {"reward_ids": ids, "perturbations": figures}))
        return
    title = (
        f"Mean score change and pairwise flips under each perturbation ({len(items)} responses, {len(pairs)} pairs)"
        "\nper reward: shift (shift over the originals' std)  flips up / down"
    )
    out_table = Table(title=title)
    out_table.add_column("perturbation")
    for name in table:
        out_table.add_column(name, justify="right")
    for p in PERTURBATIONS:
        out_table.add_row(p, *(_probe_cell(table[name][p]) for name in table))
    notes = [f"{name}: {rid}" for name, rid in ids.items()]
    if loaded.skipped:
        notes.append(f"{len(loaded.skipped)} malformed rows skipped:")
        notes.extend(f"  {e}" for e in loaded.skipped[:5])
    wide = Console(width=max(Console().width, 40 + 30 * len(table)))
    wide.print(Group(out_table, *(Text(n, style="dim") for n in notes)))


def _probe_cell(c) -> str:
    if c.mean_shift is None:
        return "[dim]failed[/dim]"
    effect = "" if c.effect is None else f" ({c.effect:+.2f})"
    flips = "" if c.flip_up is None else f"  {c.flip_up:.0%} / {c.flip_down:.0%}"
    failed = f" [dim]{c.failed} failed[/dim]" if c.failed else ""
    flag = "[red]" if abs(c.mean_shift) > 1e-6 and (c.effect is None or abs(c.effect) >= 0.5) else ""
    return f"{flag}{c.mean_shift:+.3f}{effect}{flips}{failed}"


def _client(spec: Path | None, rm_url: str | None, api_key: str | None, rewards: list[str], timeout_s: float):
    """A reward client of the service at `rm_url`, or of `spec` served in this process (its named rewards)."""
    from assay.clients import RewardClient

    if rm_url is None:
        from assay.rm_server.local import LocalTransport
        from assay.rm_server.spec import SpecError

        try:
            return RewardClient(LocalTransport(spec, rewards=rewards or None), timeout_s=timeout_s)
        except (SpecError, ValueError, OSError) as exc:
            refuse(exc)
    if spec is not None:
        refuse(ValueError("give --spec (served here) or --rm-url (a running service), not both"))
    client = RewardClient.http(rm_url, api_key=api_key, timeout_s=timeout_s)
    if not client.health(timeout_s=10):  # else every call would retry an absent server until its deadline
        client.close()
        refuse(ValueError(f"no reward service answers at {rm_url}"))
    return client


@contextmanager
def _progress():
    """A progress bar over the responses scored, on stderr (so that --json's stdout is the report alone):
    yields (advance(n), set_total(n))."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task("score", total=None)
        yield (lambda n: bar.advance(task, n)), (lambda n: bar.update(task, total=n))


def _eval_table(r: dict) -> Group:
    """The report as RewardBench shows one: accuracy, ties, margin per subset, then the whole set; notes below."""
    table = Table(title=f"{r['reward']} on {r['data']}: {r['rows']} rows, {r['pairs']} pairs scored")
    for col in ("subset", "pairs", "accuracy", "ties", "mean margin", "failed pairs"):
        table.add_column(col, justify="left" if col == "subset" else "right")

    def row(name: str, f: dict, style: str = "") -> None:
        acc = "n/a" if f["accuracy"] is None else f"{f['accuracy']:.1%}"
        margin = "n/a" if f["mean_margin"] is None else f"{f['mean_margin']:+.4f}"
        table.add_row(name, str(f["pairs"]), acc, str(f["ties"]), margin, str(f["failed_pairs"]), style=style)

    for name, f in r["subsets"].items():
        row(name, f)
    row("all", r, style="bold")
    notes = [
        f"reward id {r['reward_id']}",
        "ties count as wrong (RewardBench); failed pairs are left out of every figure",
    ]
    if r["failures"]:
        notes.append("failed responses: " + ", ".join(f"{n} {t}" for t, n in r["failures"].items()))
        notes.extend(f"  {e}" for e in r["failure_examples"])
    if r["skipped_rows"]:
        notes.append(f"{r['skipped_rows']} malformed rows skipped:")
        notes.extend(f"  {e}" for e in r["skipped_row_errors"][:5])
    return Group(table, *(Text(n, style="dim") for n in notes))
