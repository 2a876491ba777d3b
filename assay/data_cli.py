"""`assay data arith`: the embedded arithmetic world as dataset files, in the formats `assay.data` reads.

    assay data arith --kind preferences --out prefs.jsonl       # the ranked groups the committed ORM trained on
    assay data arith --kind demonstrations --out demos.jsonl    # prompt + completion (worked solutions)
    assay data arith --kind prompts --split heldout --out eval.jsonl   # prompt + answer (GSM8K-style column)

Each (kind, split) is one function in `EXPORTS` returning the rows; the command writes them as JSONL,
one object per line, with a progress bar where the rows take a while (the policy's own samples).

- **preferences, train**: what `assay models build` trains the ORM on (`assay.build.rollouts` and
  `ranked_groups`): the committed policy's temperature-1 samples on the build's training problems,
  one K-wise row per correct sample, `responses` = [that sample, the problem's incorrect ones] with
  `scores` [1, 0, ...], in the build's order. `assay train rm --loss bt` on it with the build's
  settings (from the PRM) draws the same pairs the build drew. Takes a few minutes (8,192 samples).
- **preferences, heldout**: the outcome RM's held-out pairs exactly as `assay eval` forms them
  (`assay.evaluate.heldout_preferences`: the policy's samples of the held-out problems with the
  sampling seed --seed, every (correct, incorrect) pair of the same problem, `subset` whether the
  wrong side is well formed), so `assay rm eval --data FILE --reward orm` measures through the
  service the figures `assay eval --problems COUNT --seed SEED` computes in-process.
- **demonstrations** and **prompts**: worked solutions and prompts with their `answer`, from the
  training split (drawn with --seed) or the held-out problems `assay eval` measures on.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import typer
from rich.console import Console
from rich.progress import Progress

data_app = typer.Typer(help="Dataset files from the embedded arithmetic world.", no_args_is_help=True)
console = Console(soft_wrap=True)  # an error naming a long path stays one line

Kind = Literal["preferences", "demonstrations", "prompts"]
Split = Literal["train", "heldout"]
Rows = list[dict[str, Any]]
Tick = Callable[[int, int], None]  # (done, total): a progress bar's hook


def train_preferences(count: int | None, seed: int, tick: Tick) -> Rows:
    """The build's ORM training data: one K-wise row per ranked group (`assay.build.ranked_groups`)."""
    from assay.build import BuildConfig, ranked_groups, rollouts
    from assay.checkpoints import load_embedded

    cfg = BuildConfig(seed=seed)
    cfg = replace(cfg, rollout_problems=count) if count is not None else cfg
    policy, tokenizer = load_embedded("policy")
    groups = ranked_groups(rollouts(policy, tokenizer, cfg, on_batch=tick))
    return [
        {"prompt": g.prompt, "responses": g.responses, "scores": [float(i == g.best) for i in range(len(g.responses))]}
        for g in groups
    ]


def heldout_preferences(count: int | None, seed: int, tick: Tick) -> Rows:
    """`assay eval`'s held-out ORM pairs, for `count` problems (default its 128) and sampling seed `seed`."""
    from assay.eval_config import EvalConfig
    from assay.evaluate import heldout_preferences as pairs

    return pairs(EvalConfig(problems=count or 128, seed=seed))


def demonstrations(split: Split) -> Callable[[int | None, int, Tick], Rows]:
    def rows(count: int | None, seed: int, tick: Tick) -> Rows:
        return [{"prompt": p.prompt, "completion": p.solution} for p in _problems(split, count, seed)]

    return rows


def prompts(split: Split) -> Callable[[int | None, int, Tick], Rows]:
    def rows(count: int | None, seed: int, tick: Tick) -> Rows:
        return [{"prompt": p.prompt, "answer": str(p.answer)} for p in _problems(split, count, seed)]

    return rows


def _problems(split: Split, count: int | None, seed: int) -> list[Any]:
    from assay.arith import world

    if split == "heldout":  # the fixed held-out set `assay eval` measures on (no seed)
        return world.eval_problems(count or 128)
    return world.take("train", count or 2048, seed=seed)


EXPORTS: dict[tuple[str, str], Callable[[int | None, int, Tick], Rows]] = {
    ("preferences", "train"): train_preferences,
    ("preferences", "heldout"): heldout_preferences,
    ("demonstrations", "train"): demonstrations("train"),
    ("demonstrations", "heldout"): demonstrations("heldout"),
    ("prompts", "train"): prompts("train"),
    ("prompts", "heldout"): prompts("heldout"),
}


@data_app.command("arith")
def arith_cmd(
    kind: Kind = typer.Option(..., help="preferences (K-wise rows), demonstrations, or prompts (with answer)"),
    split: Split = typer.Option("train", help="training problems, or the held-out ones `assay eval` uses"),
    out: Path = typer.Option(..., help="the JSONL file to write"),
    count: int = typer.Option(
        None, help="problems (default: preferences the build's 2048, demonstrations 2048, prompts 2048 / 128 held out)"
    ),
    seed: int = typer.Option(
        0,
        help="the build's seed (train preferences), the sampling seed (heldout preferences, as `assay eval`), "
        "or the training problems' draw",
    ),
) -> None:
    """Write the embedded world's data as a dataset file, for `assay train` and `assay rm eval`."""
    export = EXPORTS.get((kind, split))
    if export is None:
        known = ", ".join(f"{k} --split {s}" for k, s in EXPORTS)
        raise typer.BadParameter(f"no {kind} export of the {split} split; there are: {known}")
    if count is not None and count < 1:
        raise typer.BadParameter("--count must be >= 1")
    with Progress(*Progress.get_default_columns(), console=console, transient=True) as bar:
        task = bar.add_task(f"{kind} ({split})", total=None)
        rows = export(count, seed, lambda done, total: bar.update(task, completed=done, total=total))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    console.print(f"wrote {len(rows)} {kind} rows to {out}")
