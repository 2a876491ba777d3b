"""`assay train sft|rm` and `assay train dpo --data`: training from dataset files, offline (no services).

    assay train sft --model PATH --data demos.jsonl --out DIR [--eval-data FILE | --eval-fraction 0.1 --seed 0]
    assay train rm  --model PATH --data prefs.jsonl --loss bt|listwise|margin --out DIR [--eval-every 50]
    assay train dpo --model PATH --data prefs.jsonl --out DIR

Rows are read with `assay.data` (JSONL, JSON, Parquet, CSV or a `save_to_disk` folder, in TRL's
standard or conversational format); a malformed row ends the command with its file, row and column,
or with `--skip-bad-rows` is skipped and counted (on the console and in the run's config.json).
Conversations are rendered with the model's own chat template (`trainer.files`).

DIR receives a Hugging Face checkpoint, model and tokenizer and nothing else, so that
`from_pretrained(DIR)`, `assay policy serve --model DIR` and an rm_server spec's `path: DIR` load it,
and its reward id (a digest of every file there) does not change when the run is plotted later. The
run's metrics.jsonl, config.json and TensorBoard events go to `--run-dir`, by default beside it
(DIR.run). With `--eval-data` or `--eval-fraction`, the held-out figure (SFT: completion loss; RM:
pairwise accuracy; DPO: implicit-reward accuracy) is logged every `--eval-every` steps and at the end.

Every field of the algorithm's config is an option (`trainer.config.SFTConfig`, `trainer.config.RMConfig`,
`trainer.config.DPOConfig`), as for the online commands; `--seed` also seeds the held-out split.
"""

from __future__ import annotations

import random
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from assay.cli_options import config_options
from assay.trainer.cli import CONFIG_HELP, console, load_config, open_run_dir
from assay.trainer.config import Hardware, RMConfig, SFTConfig

MODEL_HELP = "a local Hugging Face checkpoint to start from"
DATA_HELP = ".jsonl, .json, .parquet, .csv or a save_to_disk folder"
OUT_HELP = "where the trained checkpoint (model + tokenizer) goes"
RUN_DIR_HELP = "where metrics.jsonl, config.json and TensorBoard events go (default: OUT.run, beside OUT)"
EVAL_DATA_HELP = "held-out rows in a file of their own"
EVAL_FRACTION_HELP = "held-out share of --data's rows, drawn with --seed (when there is no --eval-data)"
EVAL_EVERY_HELP = "steps between held-out evaluations (and one at the end)"
SKIP_HELP = "skip malformed rows, counting them, instead of stopping at the first"
OVERWRITE_HELP = "replace the checkpoint in OUT and the run in the run directory"
SFT_CONFIG_HELP = CONFIG_HELP.format(SFTConfig.__name__)
RM_CONFIG_HELP = CONFIG_HELP.format(RMConfig.__name__)


@dataclass(frozen=True)
class Files:
    """What a training run from files was given: the options sft, rm and offline dpo share."""

    model: Path
    data: Path
    out: Path
    run_dir: Path | None = None
    eval_data: Path | None = None
    eval_fraction: float = 0.0
    eval_every: int = 50
    skip_bad_rows: bool = False
    overwrite: bool = False
    torch_threads: int = 1


@dataclass
class Rows:
    """The rows a run trains and evaluates on, and what was skipped."""

    train: list[Any]
    heldout: list[Any]
    skipped: int
    path: str


@config_options(SFTConfig)
def sft_cmd(
    given: dict,
    model: Path = typer.Option(..., help=MODEL_HELP + " (a causal LM)"),
    data: Path = typer.Option(..., help="demonstrations: prompt + completion, or messages; " + DATA_HELP),
    out: Path = typer.Option(..., help=OUT_HELP),
    run_dir: Path = typer.Option(None, help=RUN_DIR_HELP),
    eval_data: Path = typer.Option(None, help=EVAL_DATA_HELP),
    eval_fraction: float = typer.Option(0.0, help=EVAL_FRACTION_HELP),
    eval_every: int = typer.Option(50, help=EVAL_EVERY_HELP),
    skip_bad_rows: bool = typer.Option(False, help=SKIP_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    config: Path = typer.Option(None, exists=True, dir_okay=False, help=SFT_CONFIG_HELP),
    torch_threads: int = typer.Option(1, help="torch threads"),
) -> None:
    """Supervised fine-tuning on demonstrations (loss on completion tokens only); saves a checkpoint."""
    from assay.data import load_demonstrations
    from assay.trainer import files as rows_as
    from assay.trainer.sft import eval_loss, train_sft

    cfg: SFTConfig = load_config(SFTConfig, config, given)
    opts = Files(
        model, data, out, run_dir, eval_data, eval_fraction, eval_every, skip_bad_rows, overwrite, torch_threads
    )
    rows = _rows(opts, load_demonstrations, cfg.seed)
    run = _open(opts)
    net, tok = _load(model, "causal_lm", torch_threads, cfg.hardware)
    _print_sizes({"policy": net}, cfg.hardware)
    train, heldout = _guarded(
        lambda: (
            rows_as.demonstrations(tok, rows.train, rows.path),
            rows_as.demonstrations(tok, rows.heldout, rows.path),
        )
    )
    _write_config(run, "sft", cfg, opts, rows)
    with ExitStack() as stack:
        bar = _bar(stack, "sft", cfg.steps)

        def on_step(step: int, loss: float) -> None:
            m: dict[str, Any] = {"step": step + 1, "loss": loss}
            if heldout and _eval_due(step + 1, cfg.steps, eval_every):
                m["heldout_loss"] = eval_loss(net, tok, heldout)
            run.log(m)
            bar(step + 1, f"loss {loss:.4f}" + (f" held-out {m['heldout_loss']:.4f}" if "heldout_loss" in m else ""))

        losses = _training(lambda: train_sft(net, tok, _cycle(train, cfg.seed), cfg, on_step))
    _save(net, model, out)
    console.print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; checkpoint: {out}; run: {run.path}")


# label smoothing is an SFT setting: ranking has no targets to smooth
@config_options(RMConfig, exclude=("label_smoothing", "smoothing_tokens"))
def rm_cmd(
    given: dict,
    model: Path = typer.Option(
        ..., help=MODEL_HELP + " (a causal LM gets a new scalar head; a classifier keeps its own)"
    ),
    data: Path = typer.Option(..., help="preferences: prompt + chosen + rejected, or responses + scores; " + DATA_HELP),
    out: Path = typer.Option(..., help=OUT_HELP),
    run_dir: Path = typer.Option(None, help=RUN_DIR_HELP),
    eval_data: Path = typer.Option(None, help=EVAL_DATA_HELP),
    eval_fraction: float = typer.Option(0.0, help=EVAL_FRACTION_HELP),
    eval_every: int = typer.Option(50, help=EVAL_EVERY_HELP),
    skip_bad_rows: bool = typer.Option(False, help=SKIP_HELP),
    overwrite: bool = typer.Option(False, help=OVERWRITE_HELP),
    config: Path = typer.Option(None, exists=True, dir_okay=False, help=RM_CONFIG_HELP),
    torch_threads: int = typer.Option(1, help="torch threads"),
) -> None:
    """Train an outcome reward model on preferences; saves a checkpoint rm_server serves as `model.outcome`."""
    from assay.checkpoints import check_device, load_scalar_classifier
    from assay.data import load_preferences
    from assay.trainer import files as rows_as
    from assay.trainer.models import prepare
    from assay.trainer.reward_model import pairwise_accuracy, train_outcome_rm

    cfg: RMConfig = load_config(RMConfig, config, given)
    opts = Files(
        model, data, out, run_dir, eval_data, eval_fraction, eval_every, skip_bad_rows, overwrite, torch_threads
    )
    rows = _rows(opts, load_preferences, cfg.seed)
    run = _open(opts)
    _threads(torch_threads)
    _guarded(lambda: check_device(cfg.hardware.device))
    net, tok, new_head = _guarded(lambda: load_scalar_classifier(model))
    _guarded(lambda: prepare(net, cfg.hardware))
    _print_sizes({"reward model": net}, cfg.hardware, trained=("reward model",))
    train, heldout = _guarded(
        lambda: (rows_as.ranked_groups(tok, rows.train, rows.path), rows_as.ranked_groups(tok, rows.heldout, rows.path))
    )
    if len(train) < cfg.batch_size:
        _fail(f"{rows.path}: {len(train)} training rows, fewer than --batch-size {cfg.batch_size}")
    # text a chat template rendered carries its own special tokens, as rm_server reads it (`chat_template: true`)
    chat = rows_as.is_chat(rows.train)
    _write_config(run, "rm", cfg, opts, rows, new_head=new_head, chat_template=chat)
    with ExitStack() as stack:
        bar = _bar(stack, f"rm ({cfg.loss})", cfg.steps)

        def on_step(step: int, loss: float) -> None:
            m: dict[str, Any] = {"step": step + 1, "loss": loss}
            if heldout and _eval_due(step + 1, cfg.steps, eval_every):
                m["heldout_accuracy"] = pairwise_accuracy(net, tok, heldout, add_special_tokens=not chat)
            run.log(m)
            shown = f" held-out accuracy {m['heldout_accuracy']:.3f}" if "heldout_accuracy" in m else ""
            bar(step + 1, f"loss {loss:.4f}{shown}")

        _training(lambda: train_outcome_rm(net, tok, train, cfg, on_step, add_special_tokens=not chat))
    _save(net, model, out)
    last = run.metrics()[-1]
    if "heldout_accuracy" in last:
        console.print(f"held-out pairwise accuracy: {last['heldout_accuracy']:.3f} ({len(heldout)} rows)")
    template = ", chat_template: true" if chat else ""
    console.print(f"checkpoint: {out}; run: {run.path}\nserve it with this line in an rm_server spec's rewards:")
    console.print(f"  rm: {{type: model.outcome, path: {out.resolve()}{template}}}", markup=False, highlight=False)


def offline_dpo(cfg: Any, opts: Files) -> None:
    """`assay train dpo --data FILE`: DPO on the file's preference pairs (`trainer.dpo.train_offline`)."""
    from assay.data import load_preferences
    from assay.trainer import files as rows_as
    from assay.trainer.dpo import evaluate_pairs, train_offline
    from assay.trainer.models import reference

    rows = _rows(opts, load_preferences, cfg.seed)
    run = _open(opts)
    net, tok = _load(opts.model, "causal_lm", opts.torch_threads, cfg.hardware)
    train, heldout = _guarded(
        lambda: (rows_as.pairs(tok, rows.train, rows.path), rows_as.pairs(tok, rows.heldout, rows.path))
    )
    _write_config(run, "dpo", cfg, opts, rows)
    ref = reference(net)
    _print_sizes({"policy": net, "reference": ref}, cfg.hardware)
    total = cfg.epochs * -(-len(train) // cfg.batch_size)
    with ExitStack() as stack:
        bar = _bar(stack, "dpo", total)

        def on_step(step: int, m: dict[str, float]) -> None:
            line: dict[str, Any] = {"step": step + 1, **m}
            if heldout and _eval_due(step + 1, total, opts.eval_every):
                line["heldout"] = evaluate_pairs(net, ref, tok, heldout, cfg)
            run.log(line)
            bar(step + 1, f"loss {m['loss']:.4f} accuracy {m['reward_accuracy']:.2f} margin {m['margin']:.3f}")

        _training(lambda: train_offline(net, tok, train, cfg, on_step, ref_model=ref))
    _save(net, opts.model, opts.out)
    last = run.metrics()[-1]
    if "heldout" in last:
        console.print(f"held-out implicit-reward accuracy: {last['heldout']['reward_accuracy']:.3f}")
    console.print(f"checkpoint: {opts.out}; run: {run.path}")


# --- what the three share ----------------------------------------------------------------------


def _check(opts: Files) -> None:
    """Refuse what cannot work before anything is read, loaded or removed."""
    if opts.eval_data is not None and opts.eval_fraction:
        raise typer.BadParameter("give --eval-data or --eval-fraction, not both")
    if not 0 <= opts.eval_fraction < 1 or opts.eval_every < 1:
        raise typer.BadParameter("--eval-fraction must be in [0, 1) and --eval-every >= 1")
    out = opts.out
    checkpoint = (out / "config.json").is_file()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (opts.overwrite and checkpoint):
        what = "replace it with --overwrite" if checkpoint else "it is not a checkpoint"
        raise typer.BadParameter(f"{out} is not empty ({what}), or choose another --out")
    from assay.trainer.rundir import RunDir

    if RunDir.found_in(_run_path(opts)) and not opts.overwrite:
        raise typer.BadParameter(
            f"{_run_path(opts)} already holds a run; discard it with --overwrite, or choose another --run-dir"
        )


def _open(opts: Files):
    """The run directory, and OUT cleared for the new checkpoint (what `_check` allowed)."""
    if opts.overwrite and opts.out.exists():
        shutil.rmtree(opts.out)
    return open_run_dir(_run_path(opts), resume=False, overwrite=opts.overwrite, can_resume=False)


def _run_path(opts: Files) -> Path:
    return opts.run_dir or Path(f"{opts.out}.run")


def _rows(opts: Files, loader: Callable[..., Any], seed: int) -> Rows:
    """The training and held-out rows; a malformed row ends the command with its file, row and column."""
    from assay.data import DataError, split

    _check(opts)
    try:
        loaded = loader(opts.data, skip_bad_rows=opts.skip_bad_rows)
        held = loader(opts.eval_data, skip_bad_rows=opts.skip_bad_rows) if opts.eval_data is not None else None
    except DataError as exc:
        _fail(f"{exc}\n(--skip-bad-rows skips such rows and counts them)")
    skipped = [*loaded.skipped, *(held.skipped if held is not None else [])]
    if skipped:
        console.print(f"[yellow]skipped {len(skipped)} malformed rows[/yellow], the first: {skipped[0]}")
    if held is not None:
        train, heldout = loaded.rows, held.rows
    else:
        fraction = opts.eval_fraction
        train, heldout = _guarded(lambda: split(loaded.rows, fraction, seed)) if fraction else (loaded.rows, [])
    if not train:
        _fail(f"{opts.data}: no rows to train on")
    console.print(f"{len(train)} training rows, {len(heldout)} held out")
    return Rows(train, heldout, len(skipped), loaded.path)


def _write_config(run, algorithm: str, cfg: Any, opts: Files, rows: Rows, **extra: Any) -> None:
    data = {"data": str(opts.data), "eval_data": opts.eval_data and str(opts.eval_data)}
    counts = {"train_rows": len(rows.train), "heldout_rows": len(rows.heldout), "skipped_rows": rows.skipped}
    run.write_config({"algorithm": algorithm, **asdict(cfg), "model": str(opts.model), **data, **counts, **extra})


def _load(path: Path, kind: str, threads: int, hardware: Hardware):
    """The model to train, on `hardware` (`trainer.models.prepare`), and its tokenizer. A device or
    checkpoint that cannot be used ends the command."""
    from assay.checkpoints import check_device, load_model
    from assay.trainer.models import prepare

    _threads(threads)
    _guarded(lambda: check_device(hardware.device))
    attn = None if hardware.attn_implementation == "auto" else hardware.attn_implementation
    net, tok = _guarded(lambda: load_model(path, kind, attn_implementation=attn))  # type: ignore[arg-type]
    _guarded(lambda: prepare(net, hardware))
    return net, tok


def _print_sizes(modules: dict[str, Any], hardware: Hardware, trained: tuple[str, ...] = ("policy",)) -> None:
    from assay.trainer.models import sizes

    for line in sizes(modules, hardware, trained):
        console.print(line, highlight=False)


def _training(fn: Callable[[], Any]) -> Any:
    """Run the training; out of memory ends the command (exit 3) with what ran out and what to lower."""
    from assay.trainer.models import OutOfMemory

    try:
        return fn()
    except OutOfMemory as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(3)


def _threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _guarded(fn: Callable[[], Any]) -> Any:
    """Run fn; a checkpoint that cannot be loaded or a row the template cannot render ends the command."""
    from assay.checkpoints import CheckpointError

    try:
        return fn()
    except (CheckpointError, ValueError) as exc:
        _fail(str(exc))


def _fail(message: str) -> Any:
    console.print(f"[red]error:[/red] {message}", highlight=False)
    sys.exit(2)


def _save(model: Any, source: Path, out: Path) -> None:
    """The trained model and the source's tokenizer, freshly loaded (a used one may carry padding state)."""
    from assay.checkpoints import load_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    load_tokenizer(source).save_pretrained(str(out))


def _cycle(examples: Sequence[tuple[str, str]], seed: int) -> Iterator[tuple[str, str]]:
    """The examples forever, reshuffled (seeded) each pass."""
    rng = random.Random(seed)
    while True:
        order = list(examples)
        rng.shuffle(order)
        yield from order


def _eval_due(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total


def _bar(stack: ExitStack, name: str, total: int) -> Callable[[int, str], None]:
    """A progress bar for `total` steps; the call that advances it with a line of figures."""
    bar = stack.enter_context(
        Progress(
            TextColumn(name),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
    )
    task = bar.add_task(name, total=total, info="")
    return lambda step, info: bar.update(task, completed=step, info=info)
