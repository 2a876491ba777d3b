"""The run of `assay train grpo|ppo` once its options are read (`trainer/cli.py` reads them).

Order matters for a user: the policy checkpoint and the data files are read and refused first
(a bad row ends the command before any service starts, naming the file, the row and the column);
then the services start (or are reached by URL), the evaluation is set up against what rm_server
serves, and the algorithm runs with a progress bar. With `--data` the prompts are the file's
(`trainer.prompts.load_prompt_files`) and an eval set, when given, is evaluated at least at the
start and the end; without it, everything is as it always was (the arithmetic world, held-out pass@1).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from assay.trainer.config import GRPOConfig, PPOConfig, RLConfig

console = Console(soft_wrap=True)  # an error naming a long path stays one line


@dataclass(frozen=True)
class Services:
    """Where a run's services are (no URLs: both start here, on loopback) and how the trainer reaches them."""

    rm_url: str | None
    policy_url: str | None
    rm_api_key: str | None
    policy_api_key: str | None
    in_process_reward: bool
    spec: Path | None  # the reward spec of the rm_server started here (None: the embedded one)


@dataclass(frozen=True)
class Data:
    """Where a run's prompts come from (no `prompts`: the arithmetic world), its eval set and ptx data."""

    prompts: Path | None
    eval_data: Path | None
    eval_fraction: float
    reference_key: str | None
    skip_bad_rows: bool
    ptx_data: Path | None
    critic: Path | None


def run_online(
    algorithm: str,
    cfg: RLConfig,
    run,
    *,
    resume: bool,
    model_path: Path | None,
    services: Services,
    data: Data,
    torch_threads: int,
) -> None:
    import torch

    from assay.checkpoints import check_device
    from assay.data import DataError
    from assay.trainer import grpo, ppo
    from assay.trainer.evaluation import for_eval_set
    from assay.trainer.models import OutOfMemory, load_policy, prepare
    from assay.trainer.online import RewardMismatch

    torch.set_num_threads(torch_threads)
    try:  # on the device before any service starts: a device or attention the machine lacks ends it here
        check_device(cfg.hardware.device)
        net, tok = load_policy(model_path, cfg.hardware)
        prepare(net, cfg.hardware)
        # on the CPU: ppo.train prepares its own copy on the device
        critic = ppo.initial_critic(model_path, data.critic, tok) if isinstance(cfg, PPOConfig) else None
    except ValueError as exc:  # a CheckpointError, or a device or attention implementation this machine lacks
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    try:  # a bad file is refused before any service starts
        files, ptx = _load_data(data, tok, cfg.seed)
    except (DataError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        sys.exit(2)
    if files is not None and files.eval and not cfg.eval_every:  # an eval set is evaluated, at least at both ends
        cfg = replace(cfg, eval_every=cfg.steps)
    with ExitStack() as stack:
        policy, rm, reward_fn = _clients(stack, cfg, model_path, services)
        prompts = files.train if files is not None else None
        try:
            evaluation = for_eval_set(rm, cfg, reward_fn, files.eval) if files is not None and files.eval else None
        except ValueError as exc:
            raise typer.BadParameter(str(exc)) from None
        on_step = _progress(stack, algorithm, cfg.steps)
        try:
            common = dict(resume=resume, on_step=on_step, prompts=prompts, evaluation=evaluation)
            if isinstance(cfg, PPOConfig):
                ppo.train(cfg, net, tok, critic, policy, reward_fn, run, ptx_data=ptx, **common)
            else:
                assert isinstance(cfg, GRPOConfig), algorithm
                grpo.train(cfg, net, tok, policy, reward_fn, run, **common)
        except RewardMismatch as exc:
            console.print(f"[red]error:[/red] {exc}")
            sys.exit(1)
        except OutOfMemory as exc:  # the services stop with the stack; the run directory stays for --resume
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            sys.exit(3)
    console.print(f"metrics: {run.path / 'metrics.jsonl'}")


def _load_data(data: Data, tokenizer, seed: int):
    """The prompt files (None: the arithmetic world) and PPO's ptx demonstrations (None: none given);
    each skipped bad row is printed, and their count goes into the run's config.json."""
    from assay.trainer.prompts import load_prompt_files, load_ptx_data

    if data.prompts is None:
        return None, None
    files = load_prompt_files(
        tokenizer,
        str(data.prompts),
        eval_data=None if data.eval_data is None else str(data.eval_data),
        eval_fraction=data.eval_fraction,
        seed=seed,
        reference_key=data.reference_key,
        skip_bad_rows=data.skip_bad_rows,
    )
    skipped = list(files.skipped)
    ptx = None
    if data.ptx_data is not None:
        ptx, bad = load_ptx_data(tokenizer, str(data.ptx_data), skip_bad_rows=data.skip_bad_rows)
        skipped += bad
    for err in skipped:
        console.print(f"[yellow]skipped:[/yellow] {err}")
    where = f" (eval set: {len(files.eval)})" if files.eval else ""
    console.print(f"{len(files.train.prompts)} training prompts{where}, {len(skipped)} bad rows skipped")
    return files, ptx


def _clients(stack: ExitStack, cfg: RLConfig, model_path: Path | None, services: Services):
    """The policy client, the reward client and the reward function, over services started here
    when no URLs were given."""
    from assay.clients import PolicyClient, RewardClient
    from assay.services import EMBEDDED_SPEC, LocalServices

    rm_url, policy_url = services.rm_url, services.policy_url
    spec = services.spec or EMBEDDED_SPEC
    if rm_url is None or policy_url is None:
        policy_args = ["--model", str(model_path), "--model-name", "policy"] if model_path else []
        local = stack.enter_context(LocalServices.start(policy_args=policy_args, spec=spec))
        rm_url, policy_url = local.rm_url, local.policy_url
    # every call's deadline: a service killed and restarted within it costs the run only the wait
    timeout_s = cfg.service_timeout_s
    policy = stack.enter_context(PolicyClient.http(policy_url, api_key=services.policy_api_key, timeout_s=timeout_s))
    if services.in_process_reward:  # the same service and reward id, in this process: no network
        from assay.rm_server.local import LocalTransport

        # the training reward, and a pass-rate reward named in the config (`auto` finds none here)
        named = {cfg.reward, cfg.eval_pass_reward} - {"auto", "none"}
        rm = stack.enter_context(RewardClient(LocalTransport(spec, rewards=sorted(named)), timeout_s=timeout_s))
    else:
        rm = stack.enter_context(RewardClient.http(rm_url, api_key=services.rm_api_key, timeout_s=timeout_s))
    return policy, rm, rm.as_reward_fn(cfg.reward)


def _progress(stack: ExitStack, algorithm: str, steps: int):
    """A progress bar for the run; the `on_step` that advances it with each step's reward, KL and version."""
    bar = stack.enter_context(
        Progress(
            TextColumn(algorithm),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
        )
    )
    task = bar.add_task("train", total=steps, info="")

    def on_step(m: dict) -> None:
        reward = "n/a" if m.get("reward_mean") is None else f"{m['reward_mean']:.3f}"
        extra = f" pass@1 {m['heldout_pass1']:.3f}" if "heldout_pass1" in m else ""
        extra += "".join(f" {k} {v:.3f}" for k, v in m.items() if k in eval_keys(m) and v is not None)
        bar.update(
            task,
            completed=m["step"],
            info=f"reward {reward} kl {m.get('kl', 0):.4f} v{m['weight_version']} {m['seconds']:.1f}s/step{extra}",
        )

    return on_step


def eval_keys(metrics: dict) -> list[str]:
    """An eval set's figures among a step's metrics (`eval/<reward>/mean`, `eval/<reward>/pass_rate`)."""
    return [k for k in metrics if k.startswith("eval/") and k.endswith(("/mean", "/pass_rate"))]
