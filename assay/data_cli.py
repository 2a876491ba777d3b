"""`assay data arith`: the embedded arithmetic world's data as files `assay.data` reads (TRL's formats).

`--kind preferences --split heldout` writes the outcome RM's held-out pairs exactly as `assay eval`
forms them (`assay.evaluate.heldout_preferences`: the policy's samples of the held-out problems,
same seed, every (correct, incorrect) pair of the same problem), so that `assay rm eval --data FILE
--reward orm` on the file measures, through the service, the figure `assay eval` computes in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

data_app = typer.Typer(help="Data files in the formats the trainers and `assay rm eval` read.", no_args_is_help=True)


@data_app.command("arith")
def arith_cmd(
    kind: str = typer.Option(..., help="what to write: preferences"),
    split: str = typer.Option(..., help="which problems: heldout (the ones `assay eval` measures on)"),
    out: Path = typer.Option(..., help="the JSONL file to write"),
    problems: int = typer.Option(128, help="held-out problems (as `assay eval --problems`)"),
    samples: int = typer.Option(64, help="policy samples per problem (as `assay eval --samples`)"),
    seed: int = typer.Option(0, help="sampling seed (as `assay eval --seed`)"),
    checkpoints: Path = typer.Option(None, help="folder with the policy (default: the embedded one)"),
) -> None:
    """Write the embedded world's data as a JSONL file."""
    if (kind, split) != ("preferences", "heldout"):
        raise typer.BadParameter(
            f"--kind {kind} --split {split} is not written here; try --kind preferences --split heldout"
        )
    export_heldout_preferences(out, problems, samples, seed, checkpoints)


def export_heldout_preferences(out: Path, problems: int, samples: int, seed: int, checkpoints: Path | None) -> None:
    """`assay eval`'s held-out ORM pairs (its settings, same defaults) to `out`, one JSON row per pair."""
    from assay.arith import CHECKPOINTS
    from assay.eval_config import EvalConfig

    try:
        cfg = EvalConfig(problems=problems, samples=samples, seed=seed, checkpoints=checkpoints or CHECKPOINTS)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    from assay.evaluate import heldout_preferences  # torch: only once the options are good

    rows = heldout_preferences(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    well_formed = sum(r["subset"] == "well_formed" for r in rows)
    typer.echo(f"{len(rows)} pairs ({well_formed} against well-formed wrong answers) from {problems} problems -> {out}")
