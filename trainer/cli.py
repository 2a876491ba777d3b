"""`assay train grpo|ppo|dpo ...` and `assay plot RUN_DIR`.

    assay train grpo --run-dir runs/grpo                      # starts both services on loopback for the run
    assay train grpo --run-dir runs/grpo --lr 1e-5 --group-size 4 --steps 50
    assay train grpo --config grpo.yaml --run-dir runs/grpo --resume
    assay train grpo --rm-url http://127.0.0.1:8000 --policy-url http://127.0.0.1:8001 --run-dir runs/grpo
    assay train grpo --model DIR/policy --spec DIR/rm.yaml --reward orm --data prompts.jsonl \
        --eval-data eval_prompts.jsonl --run-dir runs/chat      # your own prompts, model and rewards
    assay plot runs/grpo                                      # runs/grpo/curves.png

Every field of the algorithm's config (`trainer/config.py`) is an option, with the field's default
and help (`assay.cli_options`): `assay train grpo --help` lists them. `--config FILE` (YAML or
JSON) sets fields too; an option given on the command line wins over the file. A value the config
refuses ends the command before anything starts.

With no URLs the trainer starts rm_server and policy_server itself (`assay.services`) and stops
them at the end. `--in-process-reward` computes the same reward (same code, same id) in the
trainer's process instead of asking rm_server over the network (the reward client over
`rm_server.local.LocalTransport`), to measure what the service costs.

With `--data FILE` the prompts are a file's (`assay.data.load_prompts`: JSONL, JSON, Parquet, CSV
or a `save_to_disk` folder; `prompt` a string or chat messages, rendered with the policy's chat
template; the reference found under `reference`, `answer`, `solution` or `ground_truth`, or
`--reference-key`; other columns travel to the reward), and the evaluation is on `--eval-data` or
`--eval-fraction` of the file (`trainer.evaluation.DatasetEval`). Without it, the arithmetic world
as always. `--model` takes any Hugging Face causal LM checkpoint; `--spec` the reward spec of the
rm_server started here. PPO's critic starts from the embedded ORM, or with `--model` from `--critic`
(a 1-label sequence classifier on the policy's tokenizer) or the policy itself with a new value head.

A run directory holds one run: on one that already holds a run, `--resume` continues it and
`--overwrite` clears it and starts afresh; with neither the command refuses, before anything starts.
"""

from __future__ import annotations

import json
import sys
from contextlib import ExitStack
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console

from assay.cli_options import build, config_options
from assay.trainer.config import DPOConfig, GRPOConfig, PPOConfig, RLConfig
from assay.trainer.online_cli import Data, Services, eval_keys, run_online

train_app = typer.Typer(help="Online RL against the live services.", no_args_is_help=True)
console = Console(soft_wrap=True)  # an error naming a long path stays one line


def load_config(cls: type, path: Path | None, given: dict[str, Any]) -> Any:
    """`cls` from a YAML or JSON file's fields and the options given (which win); unknown keys are an error."""
    from_file = yaml.safe_load(path.read_text()) if path is not None else None
    if from_file is not None and not isinstance(from_file, dict):
        raise typer.BadParameter(f"{path} holds no mapping of {cls.__name__} fields")
    try:
        return build(cls, from_file, given)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None


def open_run_dir(run_dir: Path, *, resume: bool, overwrite: bool, can_resume: bool = True):
    """The run directory, checked before anything starts: one run per directory, never two mixed."""
    from assay.trainer.rundir import RunDir

    if resume and overwrite:
        raise typer.BadParameter("--resume continues the run in --run-dir and --overwrite discards it: give one")
    if RunDir.found_in(run_dir) and not resume and not overwrite:
        what = "continue it with --resume, or discard it" if can_resume else "discard it"
        raise typer.BadParameter(
            f"{run_dir} already holds a run; {what} with --overwrite, or choose another "
            "--run-dir (two runs in one directory would mix their metrics)"
        )
    run = RunDir(run_dir)
    if overwrite:
        run.clear()
    return run


CONFIG_HELP = "YAML or JSON with {} fields (trainer/config.py); options given on the command line win over it"


def _online_command(algorithm: str, config_class: type[RLConfig], summary: str) -> None:
    """Register `assay train <algorithm>`: GRPO and PPO take the same options besides their config's."""
    config_help = CONFIG_HELP.format(config_class.__name__)

    def command(
        given: dict,
        run_dir: Path = typer.Option(..., help="where metrics.jsonl, config.json and checkpoints/ go"),
        config: Path = typer.Option(None, exists=True, dir_okay=False, help=config_help),
        resume: bool = typer.Option(False, help="continue from the run directory's last checkpoint"),
        overwrite: bool = typer.Option(False, help="discard the run already in the run directory, start afresh"),
        model: Path = typer.Option(None, help="initial policy checkpoint (default: the embedded policy)"),
        rm_url: str = typer.Option(None, help="a running rm_server (default: start both services here)"),
        policy_url: str = typer.Option(
            None,
            help="a running policy_server serving the same initial policy; several replicas: comma-separated "
            "URLs or a service address (every push reaches each)",
        ),
        rm_api_key: str = typer.Option(None, envvar="ASSAY_RM_API_KEY", help="key with scope score"),
        policy_api_key: str = typer.Option(None, envvar="ASSAY_POLICY_API_KEY", help="key with scopes generate, admin"),
        in_process_reward: bool = typer.Option(False, help="compute the reward in this process (same code and id)"),
        spec: Path = typer.Option(
            None, exists=True, dir_okay=False, help="reward spec of the rm_server started here (default: embedded)"
        ),
        data: Path = typer.Option(
            None, exists=True, help="prompts file (JSONL, JSON, Parquet, CSV, save_to_disk folder); default: arithmetic"
        ),
        eval_data: Path = typer.Option(None, exists=True, help="with --data: the eval set's prompts file"),
        eval_fraction: float = typer.Option(0.0, help="with --data: share of its rows held out as the eval set"),
        reference_key: str = typer.Option(None, help="with --data: the reference's column (default: found by name)"),
        skip_bad_rows: bool = typer.Option(False, help="leave malformed rows out (each reported) instead of stopping"),
        ptx_data: Path = typer.Option(None, exists=True, help="PPO with --data: demonstrations for the ptx term"),
        critic: Path = typer.Option(None, exists=True, file_okay=False, help="PPO with --model: the critic's start"),
        torch_threads: int = typer.Option(1, help="torch threads for the trainer"),
    ) -> None:
        cfg = load_config(config_class, config, given)
        if (rm_url is None) != (policy_url is None):
            raise typer.BadParameter("give both --rm-url and --policy-url, or neither (then both start here)")
        if spec is not None and rm_url is not None:
            raise typer.BadParameter("--spec is for the rm_server started here; --rm-url names one already running")
        if data is None and (eval_data is not None or eval_fraction or reference_key or ptx_data is not None):
            raise typer.BadParameter("--eval-data, --eval-fraction, --reference-key and --ptx-data go with --data")
        if algorithm != "ppo" and (ptx_data is not None or critic is not None):
            raise typer.BadParameter("--ptx-data and --critic are PPO's")
        if data is not None and getattr(cfg, "gamma_ptx", 0) > 0 and ptx_data is None:
            raise typer.BadParameter(
                "--gamma-ptx > 0 trains on demonstrations, the arithmetic world's unless given: "
                "with --data give your own with --ptx-data FILE, or set --gamma-ptx 0"
            )
        run = open_run_dir(run_dir, resume=resume, overwrite=overwrite)
        services = Services(rm_url, policy_url, rm_api_key, policy_api_key, in_process_reward, spec)
        sources = Data(data, eval_data, eval_fraction, reference_key, skip_bad_rows, ptx_data, critic)
        run_online(
            algorithm,
            cfg,
            run,
            resume=resume,
            model_path=model,
            services=services,
            data=sources,
            torch_threads=torch_threads,
        )

    command.__doc__ = summary
    train_app.command(algorithm)(config_options(config_class)(command))


_online_command(
    "grpo",
    GRPOConfig,
    "Online GRPO: groups of rollouts from the policy server, rewards from rm_server, weights pushed back.",
)
_online_command(
    "ppo", PPOConfig, "Online PPO: actor, frozen reference, critic from the embedded ORM, reward from rm_server."
)


def plot_cmd(run_dir: Path = typer.Argument(..., help="a run directory with metrics.jsonl")) -> None:
    """Write RUN_DIR/curves.png: one panel per metric the run logged (reward, held-out pass@1, KL, ...)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        console.print(f"[red]error:[/red] {path} does not exist")
        sys.exit(2)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    x = "round" if any("round" in r for r in rows) else "step"  # DPO logs rounds, GRPO and PPO steps (0: the start)
    rows = [r for r in rows if x in r]
    panels = [
        k
        for k in (
            "reward_mean",
            "heldout_pass1",
            "kl",
            "entropy",
            "clip_frac",
            "value_loss",
            "loss",
            "reward_accuracy",
            "mean_chosen_score",
            "mean_rejected_score",
            "chosen_correct",
            "seconds",
            *sorted({k for r in rows for k in eval_keys(r)}),
        )
        if any(r.get(k) is not None for r in rows) and not (k == "loss" and x == "step")
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, key in zip(axes[0], panels):
        pts = [(r[x], r[key]) for r in rows if r.get(key) is not None]
        evaluated = key == "heldout_pass1" or key in eval_keys({key: None})
        ax.plot(*zip(*pts), marker="o" if evaluated else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=110)
    console.print(f"wrote {out}")


DPO_CONFIG_HELP = CONFIG_HELP.format(DPOConfig.__name__)


@train_app.command("dpo")
@config_options(DPOConfig)
def dpo_cmd(
    given: dict,
    run_dir: Path = typer.Option(None, help="where metrics.jsonl (one line per round) and the final policy go"),
    data: Path = typer.Option(None, help="offline DPO on this file's preference pairs (trainer/offline_cli.py)"),
    model: Path = typer.Option(None, help="with --data: the causal LM to train"),
    out: Path = typer.Option(None, help="with --data: where the trained checkpoint goes"),
    eval_data: Path = typer.Option(None, help="with --data: held-out pairs in a file of their own"),
    eval_fraction: float = typer.Option(0.0, help="with --data: held-out share of its rows, drawn with --seed"),
    eval_every: int = typer.Option(50, help="with --data: steps between held-out evaluations"),
    skip_bad_rows: bool = typer.Option(
        False, help="leave malformed rows out (each reported, counted) instead of stopping"
    ),
    config: Path = typer.Option(None, exists=True, dir_okay=False, help=DPO_CONFIG_HELP),
    overwrite: bool = typer.Option(False, help="discard the run already in the run directory, start afresh"),
    rm_url: str = typer.Option(None, help="a running rm_server (default: start both services here)"),
    policy_url: str = typer.Option(
        None, help="a running policy_server; several replicas: comma-separated URLs or a service address"
    ),
    eval_problems: int = typer.Option(64, help="held-out problems for pass@1 before and after (0: none)"),
    prompts: Path = typer.Option(None, exists=True, help="iterative DPO on this file's prompts (default: arithmetic)"),
    reference_key: str = typer.Option(None, help="with --prompts: the reference's column (default: found by name)"),
    torch_threads: int = typer.Option(1, help="torch threads for the trainer"),
) -> None:
    """Iterative DPO: best-of-N through /v1/search, top and bottom candidates as pairs, weights pushed back;
    with --data, offline DPO on a file's preference pairs."""
    cfg = load_config(DPOConfig, config, given)
    if data is not None:
        from assay.trainer.offline_cli import Files, offline_dpo

        if model is None or out is None:
            raise typer.BadParameter("offline DPO (--data) needs --model and --out")
        if cfg.lora.r:
            raise typer.BadParameter("offline DPO (--data) trains the full weights: --lora-r is for online runs")
        files = Files(model, data, out, run_dir, eval_data, eval_fraction, eval_every, skip_bad_rows, overwrite)
        return offline_dpo(cfg, replace(files, torch_threads=torch_threads))
    if run_dir is None or model is not None or out is not None:
        raise typer.BadParameter(
            "iterative DPO takes --run-dir (and trains the embedded policy); --data trains offline"
        )
    import torch
    from safetensors.torch import save_file

    from assay.checkpoints import check_device, load_embedded
    from assay.trainer import lora
    from assay.trainer.evaluation import heldout_pass1
    from assay.trainer.models import OutOfMemory

    torch.set_num_threads(torch_threads)
    try:
        check_device(cfg.hardware.device)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if (rm_url is None) != (policy_url is None):
        raise typer.BadParameter("give both --rm-url and --policy-url, or neither (then both start here)")
    run = open_run_dir(run_dir, resume=False, overwrite=overwrite, can_resume=False)  # DPO runs do not resume
    searched = _search_prompts(prompts, reference_key, skip_bad_rows) if prompts is not None else None
    run.write_config(
        {
            "algorithm": "dpo",
            **{f.name: getattr(cfg, f.name) for f in fields(cfg)},
            **(searched.describe() if searched is not None else {}),
        }
    )
    if eval_problems:
        start, tok = load_embedded("policy")
        run.log({"eval": "before", "heldout_pass1": heldout_pass1(start, tok, eval_problems)})

    def on_round(m: dict, pairs) -> None:
        run.log(m)
        console.print(
            f"round {m['round']}: {m['pairs']} pairs, loss {m.get('loss') or float('nan'):.4f}, "
            f"v{m['weight_version']}, {m['seconds']:.1f}s"
        )

    try:
        history, model = _iterative_dpo(cfg, rm_url, policy_url, on_round, searched)
    except OutOfMemory as exc:  # the services have stopped; the rounds so far are in metrics.jsonl
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        sys.exit(3)
    if eval_problems:
        _, tok = load_embedded("policy")
        final = heldout_pass1(model, tok, eval_problems)
        run.log({"eval": "after", "heldout_pass1": final, "rounds": len(history)})
        console.print(f"held-out pass@1: {run.metrics()[0]['heldout_pass1']:.3f} -> {final:.3f}")
    if lora.is_lora(model):
        model = lora.merged(model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, run.path / "policy.safetensors")


def _search_prompts(path: Path, reference_key: str | None, skip_bad_rows: bool):
    """Iterative DPO's prompts from a file (`DatasetPrompts`), chat messages rendered with the
    embedded policy's template; each skipped bad row printed. A bad file ends the command here."""
    from assay.checkpoints import ARITH_DIR, load_tokenizer
    from assay.data import DataError
    from assay.trainer.prompts import load_prompt_files

    try:
        files = load_prompt_files(
            load_tokenizer(ARITH_DIR / "policy"), str(path), reference_key=reference_key, skip_bad_rows=skip_bad_rows
        )
    except (DataError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    for err in files.skipped:
        console.print(f"[yellow]skipped:[/yellow] {err}")
    console.print(f"{len(files.train.prompts)} prompts, {len(files.skipped)} bad rows skipped")
    return files.train


def _iterative_dpo(
    cfg: DPOConfig, rm_url: str | None, policy_url: str | None, on_round, searched=None
) -> tuple[list[dict], Any]:
    """Iterative DPO of the embedded policy; the per-round metrics and the trained model.

    With no URLs, both services start on loopback for the run. The embedded policy's weights are
    pushed first, so the searches sample exactly the weights being trained, whatever the server
    held before. Training prompts are `searched`'s (a file's, in its order) or else
    `world.take("train", rounds * prompts_per_round, seed)`, each sent with its reference as the
    search's (model rewards ignore it; `correct` and `final` need it), and the run holds rm_server's
    id for the reward from the start.
    """
    from assay.arith import world
    from assay.clients import PolicyClient, RewardClient
    from assay.services import LocalServices
    from assay.trainer import lora
    from assay.trainer.dpo import iterative_dpo
    from assay.trainer.models import load_policy, prepare
    from assay.trainer.online import sync_weights
    from assay.trainer.prompts import from_problem

    with ExitStack() as stack:
        if rm_url is None or policy_url is None:
            local = stack.enter_context(LocalServices.start())
            rm_url, policy_url = local.rm_url, local.policy_url
        timeout_s = cfg.service_timeout_s
        with RewardClient.http(rm_url, timeout_s=timeout_s) as rm:
            expected = rm.reward_id(cfg.reward)
        model, tokenizer = load_policy(None, cfg.hardware)
        if searched is not None:
            prompts = searched.prompts
        else:
            prompts = [from_problem(p) for p in world.take("train", cfg.rounds * cfg.prompts_per_round, seed=cfg.seed)]
        policy = stack.enter_context(PolicyClient.http(policy_url, timeout_s=timeout_s))
        sync_weights(policy, model, None, timeout_s)  # the full base: adapter pushes merge into it
        if cfg.lora.r:  # on its device first: peft puts the adapter where the layers it wraps are
            model = lora.wrap(prepare(model, cfg.hardware), cfg.lora)
        history = iterative_dpo(
            model,
            tokenizer,
            policy,
            cfg,
            [p.text for p in prompts],
            on_round,
            references=[p.reference for p in prompts],
            expected_reward_id=expected,
        )
    return history, model
