"""The `assay` command line."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TaskID, TextColumn
from rich.table import Table

from assay.data_cli import data_app
from assay.deploy.cli import deploy_app
from assay.policy_server.cli import policy_app, search_cmd
from assay.rm_server.cli import rm_app
from assay.trainer.cli import plot_cmd, train_app
from assay.trainer.offline_cli import rm_cmd, sft_cmd

app = typer.Typer(help="Assay: rewards as a service, inference-time search, online RLHF.", no_args_is_help=True)
models_app = typer.Typer(
    help="The embedded arithmetic world's checkpoints; the tiny-chat fixture.", no_args_is_help=True
)
app.add_typer(models_app, name="models")
app.add_typer(rm_app, name="rm")
app.add_typer(data_app, name="data")
app.add_typer(policy_app, name="policy")
app.add_typer(deploy_app, name="deploy")
app.command("search")(search_cmd)
train_app.command("sft")(sft_cmd)
train_app.command("rm")(rm_cmd)
app.add_typer(train_app, name="train")
app.command("plot")(plot_cmd)
console = Console(soft_wrap=True)  # an error naming a long path stays one line

_LABELS = {
    "pass@1": "policy pass@1 (T=1.0)",
    "pass@4": "policy pass@4",
    "pass@16": "policy pass@16",
    "pass@64": "policy pass@64",
    "orm_pairwise_accuracy": "outcome RM pairwise accuracy",
    "orm_pairwise_accuracy_well_formed": "  (vs well-formed wrong answers)",
    "orm_auroc": "outcome RM AUROC",
    "prm_step_accuracy": "process RM step accuracy",
    "prm_step_majority_baseline": "  (always the commoner step label)",
    "verifier_accuracy": "verifier accuracy (balanced)",
}


def _print_version(asked: bool) -> None:
    if asked:
        from assay.version import version_text

        typer.echo(version_text())
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", "-V", callback=_print_version, is_eager=True, help="print the version and exit"
    ),
) -> None:
    """Assay: rewards as a service, inference-time search, online RLHF."""


def eval_table(figures: dict[str, float]) -> Table:
    from assay.eval_config import TARGETS

    table = Table(
        title=f"Held-out evaluation: {figures['heldout_problems']} problems, "
        f"{figures['samples_per_problem']} samples each"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    for key, label in _LABELS.items():
        lo_hi = TARGETS.get(key)
        target = "" if lo_hi is None else (f">= {lo_hi[0]:.0%}" if lo_hi[1] >= 1 else f"{lo_hi[0]:.0%}-{lo_hi[1]:.0%}")
        ok = lo_hi is None or lo_hi[0] <= figures[key] <= lo_hi[1]
        value = "n/a" if figures[key] != figures[key] else f"{figures[key]:.1%}"
        table.add_row(label, value, target + ("" if ok else "  [red]missed[/red]"))
    return table


@app.command("eval")
def eval_cmd(
    as_json: bool = typer.Option(False, "--json", help="print the figures as one JSON object"),
    problems: int = typer.Option(128, help="held-out problems"),
    samples: int = typer.Option(64, help="policy samples per problem"),
    seed: int = typer.Option(0, help="sampling seed"),
    checkpoints: Path = typer.Option(None, help="folder with policy/orm/prm/verifier (default: the embedded ones)"),
) -> None:
    """Evaluate the embedded checkpoints on the fixed held-out set."""
    from assay.arith import CHECKPOINTS
    from assay.eval_config import EvalConfig

    try:
        cfg = EvalConfig(problems=problems, samples=samples, seed=seed, checkpoints=checkpoints or CHECKPOINTS)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    from assay.evaluate import evaluate  # torch: only once the options are good

    with _eval_bars(shown=not as_json) as progress:
        figures = _guarded(lambda: evaluate(cfg, progress))
    if as_json:
        # a figure with nothing to measure (no pairs on a tiny set) is NaN: null in strict JSON
        typer.echo(json.dumps({k: None if v != v else v for k, v in figures.items()}))
    else:
        console.print(eval_table(figures))
        console.print(f"[dim]{figures['seconds']:.0f}s on this machine[/dim]")


@app.command("run")
def run_cmd(
    problems: int = typer.Option(64, help="held-out problems"),
    n: int = typer.Option(8, help="candidates per search (beams for beam search and DVTS)"),
    seed: int = typer.Option(0, help="search seed (problem i uses seed + i)"),
    in_flight: int = typer.Option(4, help="searches sent at once"),
) -> None:
    """The main job: start rm_server and policy_server on loopback, search held-out problems over
    HTTP with each strategy, print accuracy, tokens and latency, and stop the servers."""
    from assay.main_job import run

    try:
        run(problems=problems, n=n, seed=seed, in_flight=in_flight, console=console)
    except RuntimeError as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(1)


@models_app.command("build")
def models_build(
    out: Path = typer.Option(None, help="where to write the checkpoints (default: the package's own)"),
    seed: int = typer.Option(0, help="seed for every stage"),
    skip_policy: bool = typer.Option(False, help="keep the policy in --out; rebuild only the reward models"),
) -> None:
    """Rebuild the four embedded checkpoints deterministically from seeds."""
    from assay.build import BuildConfig, build
    from assay.checkpoints import ARITH_DIR

    target = out or ARITH_DIR
    with _stage_bars() as (log, on_step):
        timings = build(target, BuildConfig(seed=seed), log=log, progress=on_step, skip_policy=skip_policy)
    console.print(f"built {', '.join(timings)} in {sum(timings.values()):.0f}s -> {target}")


@models_app.command("tiny-chat")
def models_tiny_chat(
    out: Path = typer.Option(..., help="folder to write policy/, orm/, the data files and rm.yaml into"),
    seed: int = typer.Option(0, help="seed for the data, the tokenizers and both models"),
) -> None:
    """Build a tiny real-shaped chat policy (Qwen2, byte-level BPE, ChatML), an outcome RM with another
    tokenizer and template, and chat data files (prompts, preferences, demonstrations) to try the chain on."""
    from assay.tiny_chat import TinyChatConfig, build

    with _stage_bars() as (log, on_step):
        report = build(out, TinyChatConfig(seed=seed), log=log, progress=on_step)
    console.print(f"built in {sum(report['seconds'].values()):.0f}s -> {out} (figures in {out / 'build.json'})")


@contextmanager
def _stage_bars() -> Iterator[tuple[Callable[[str], None], Callable[[str, int, int, float], None]]]:
    """A progress bar per training stage: (log, on_step(stage, step, total, loss)) for a build."""
    with Progress(*Progress.get_default_columns(), TextColumn("loss {task.fields[loss]:.4f}"), console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def on_step(stage: str, step: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, loss=float("nan"))
            bar.update(tasks[stage], completed=step, loss=loss)

        yield bar.console.print, on_step


@contextmanager
def _eval_bars(shown: bool) -> Iterator[Callable[[str, int, int], None]]:
    """A bar per `assay eval` stage on stderr, on a terminal only (never with --json): yields its hook."""
    err = Console(stderr=True)
    columns = (*Progress.get_default_columns(), MofNCompleteColumn())
    with Progress(*columns, console=err, disable=not (shown and err.is_terminal)) as bar:
        tasks: dict[str, TaskID] = {}

        def on_stage(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total)
            bar.update(tasks[stage], completed=done, total=total)

        yield on_stage


def _guarded(fn):
    """Run fn; a checkpoint that cannot be loaded ends the command with its one-line reason."""
    from assay.checkpoints import CheckpointError

    try:
        return fn()
    except CheckpointError as e:
        console.print(f"[red]error:[/red] {e}")
        sys.exit(2)


def main() -> None:
    app()
