"""The online loop and its plumbing: rollouts from the policy server, rewards by reward id, weight
pushes, held-out evaluation, and resume from the run directory (`trainer.rundir`).

`steps` is the loop every online algorithm runs on: a step samples from the weights the server
serves, trains, and pushes the new weights, whose version the next step samples from. GRPO and
PPO run it through `run` (resume, reward id, evaluation, metrics, checkpoints), with a `Run` (the
config, the model and tokenizer, both clients, the run directory) as what each step works with;
iterative DPO's rounds are its steps too, and stop on the same `RewardMismatch`.

The trainer never computes a reward itself: `reward_fn` is `clients.RewardClient.as_reward_fn`,
`f(prompts, completions, reference=[...]) -> list[float | None]` carrying a `.reward_id`, over
whichever transport the caller chose (rm_server over HTTP or gRPC, or the same service in this
process, `rm_server.local.LocalTransport`: the same reward code and id). The policy server
generates every rollout, and its replies carry the weight version that produced each sample;
`sync_weights` makes the server hold exactly the trainer's weights before each rollout (after a
restart it holds the checkpoint it started from), and samples from any other version are dropped
and counted, never mixed in.

Every call to either service has the config's `service_timeout_s` as its deadline, and the clients
retry transient failures (refused, reset, 503 while loading) until it: a service that is killed
and restarted within it costs the run only the wait. Whether a weight push whose answer was lost
landed is read from the server's version (`push_weights`), so it lands once.

Every push names the version it makes (the last one + 1): a version means one set of weights on every
replica of the policy (a `PolicyClient` of several URLs pushes to each; under Ray Serve the replicas
share each push, `deploy/weight_sync.py`), and a replica that restarted at 0 is given the current
version directly. Samples are taken from any replica; those from another version are dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch

from assay.clients.errors import Conflict, Unavailable
from assay.clients.policy import PolicyClient
from assay.policy_server.protocol import WeightUpdateResponse
from assay.trainer import lora
from assay.trainer.config import RLConfig
from assay.trainer.models import cpu_state, sizes
from assay.trainer.prompts import Prompt, PromptSource
from assay.trainer.rundir import RunDir

RewardFn = Callable[..., list[float | None]]
StepFn = Callable[[int, int], dict[str, Any]]  # (step, weight version serving now) -> the step's metrics
OnStep = Callable[[dict[str, Any]], None]


class RewardMismatch(RuntimeError):
    """The reward answering now is not the one this run was trained on."""


class RunExists(RuntimeError):
    """The run directory already holds a run, and this one was not asked to continue it."""


C = TypeVar("C", bound=RLConfig)


class Evaluation(Protocol):
    """What a run measures on held-out prompts at step 0 and every `eval_every` steps
    (`trainer.evaluation`: the arithmetic world's pass@1, or an eval set's rewards)."""

    def reward_ids(self) -> dict[str, str]:
        """name -> id of every reward it scores with (besides the training reward); {} for none."""
        ...

    def __call__(self, run: Run, version: int) -> dict[str, Any]:
        """Metrics of the weights at `version`, which the trainer holds and the server serves."""
        ...


@dataclass
class Run(Generic[C]):
    """What one run of GRPO or PPO works with: its loop, rollouts and steps take this, not ten arguments."""

    config: C
    model: torch.nn.Module  # the policy being trained; the policy server serves its weights
    tokenizer: Any
    policy: PolicyClient
    reward_fn: RewardFn  # RewardClient.as_reward_fn: the reward by id, over any transport
    run_dir: RunDir
    prompts: PromptSource  # what each step trains on (`draw(step, count, seed)`)
    evaluation: Evaluation


# --- rollouts --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rollout:
    """One sampled completion of one prompt, as the policy server produced it."""

    prompt: Prompt
    prompt_ids: list[int]
    completion_ids: list[int]  # eos included when the model stopped
    text: str
    server_logprobs: list[float]  # per completion token, from the server (raw model, T-independent)
    weight_version: int


def sample_groups(
    policy: PolicyClient,
    problems: Sequence[Prompt],
    group_size: int,
    *,
    temperature: float,
    max_tokens: int,
    seed: int,
    version: int,
    timeout_s: float | None = None,
) -> tuple[list[list[Rollout]], int]:
    """`group_size` completions per problem; those not generated by `version` are dropped.
    Returns the groups (some may be short) and the number of stale samples dropped."""
    reply = policy.complete(
        [p.text for p in problems],
        n=group_size,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        logprobs=0,
        return_token_ids=True,
        timeout_s=timeout_s,
    )
    groups: list[list[Rollout]] = [[] for _ in problems]
    stale = 0
    for choice in reply.choices:
        i = choice.index // group_size
        if choice.weight_version != version:
            stale += 1
            continue
        groups[i].append(
            Rollout(
                prompt=problems[i],
                prompt_ids=choice.prompt_token_ids or [],
                completion_ids=choice.token_ids or [],
                text=choice.text,
                server_logprobs=list(choice.logprobs.token_logprobs) if choice.logprobs else [],
                weight_version=choice.weight_version,
            )
        )
    return groups, stale


# TRL's reward-function arguments: a dataset column of these names cannot travel as a keyword
RESERVED_COLUMNS = frozenset({"prompts", "completions", "reference"})


def score(reward_fn: RewardFn, rollouts: Sequence[Rollout]) -> list[float | None]:
    """One reward per rollout; a failed or non-finite reward is None (masked, counted), never 0.

    The arguments are TRL's (`f(prompts, completions, **columns)`): a prompt that came as chat
    messages goes as the conversation with the completion as an assistant message (TRL's
    conversational format), never as the policy's rendering of it; other prompts go as the text
    the policy continued. The reference and the row's other columns go as keywords, one value per
    rollout (None where a row lacks that column)."""
    if not rollouts:
        return []
    prompts: list[Any] = [r.prompt.messages if r.prompt.messages is not None else r.prompt.text for r in rollouts]
    completions: list[Any] = [
        [{"role": "assistant", "content": r.text}] if r.prompt.messages is not None else r.text for r in rollouts
    ]
    names = sorted({k for r in rollouts for k in r.prompt.metadata} - RESERVED_COLUMNS)
    columns = {k: [r.prompt.metadata.get(k) for r in rollouts] for k in names}
    values = reward_fn(prompts, completions, reference=[r.prompt.reference for r in rollouts], **columns)
    return [v if v is not None and math.isfinite(v) else None for v in values]


def reward_id_of(reward_fn: RewardFn) -> str:
    """The id of the reward `reward_fn` answers with; RewardMismatch when it carries none."""
    current = getattr(reward_fn, "reward_id", None)
    if current is None:
        raise RewardMismatch("the reward function carries no reward_id: use RewardClient.as_reward_fn")
    return current


def same_reward(current: str, recorded: str | None, where: str) -> str:
    """`current`, the id the reward answers with now, which must be the one the run recorded (if any)."""
    if recorded is not None and current != recorded:
        raise RewardMismatch(
            f"{where}: this run was trained on reward {recorded}, and the reward now answers as "
            f"{current}: rm_server's reward changed mid-run, and rewards with different ids must "
            "not be mixed in one run"
        )
    return current


# --- tensors ---------------------------------------------------------------------------------


@dataclass
class Batch:
    """Rollouts as right-padded tensors. `completion_mask[i, t]` is 1 where token t+1 of row i is a
    completion token, so it lines up with the logprobs of `token_logprobs` ([rows, length - 1])."""

    input_ids: torch.Tensor  # [rows, length]
    attention_mask: torch.Tensor  # [rows, length]
    completion_mask: torch.Tensor  # [rows, length - 1], float


def pack(rollouts: Sequence[Rollout], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    """The rollouts as one right-padded batch on `device` (the model's): built on the CPU, moved once."""
    length = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), length), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rollouts), length), dtype=torch.long)
    comp = torch.zeros((len(rollouts), length - 1))
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.completion_ids)
        ids[i, : p + c] = torch.tensor(r.prompt_ids + r.completion_ids)
        attn[i, : p + c] = 1
        comp[i, p - 1 : p + c - 1] = 1  # logprob at position t is of token t+1
    return Batch(ids.to(device), attn.to(device), comp.to(device))


def server_gap(rollouts: Sequence[Rollout], logp: torch.Tensor) -> float:
    """Max |server logprob - trainer logprob| over completion tokens (`logp` from `token_logprobs`
    on `pack(rollouts)`): near 0 when the server sampled with exactly the trainer's weights."""
    gap = 0.0
    for i, r in enumerate(rollouts):
        if r.server_logprobs:
            p = len(r.prompt_ids)
            mine = logp[i, p - 1 : p - 1 + len(r.completion_ids)]
            gap = max(gap, float((mine - torch.tensor(r.server_logprobs, device=mine.device)).abs().max()))
    return gap


def token_logprobs(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprobs of each next token, logits) under `model` (a causal LM, or `lora.Reference`):
    [rows, length - 1] and [rows, length - 1, vocab].

    Float32 whatever the compute dtype: the logits are upcast before the log-softmax."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    logits = logits[:, :-1].float()
    targets = batch.input_ids[:, 1:]
    logp = logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)
    return logp, logits


# --- the policy server's weights ---------------------------------------------------------------


def sync_weights(
    policy: PolicyClient, model: torch.nn.Module, version: int | None, timeout_s: float | None = None
) -> int:
    """Make the server (every replica, with a client of several) hold `model`'s weights; the version it
    serves them under.

    `version` is what the trainer last pushed, `model` unchanged since. A server that reports less
    restarted from its checkpoint: it is given these weights again under that same version, so one
    version names one set of weights on every replica and across restarts. One that reports another
    version (the run's first sync, or another writer's push) is given them as one past it."""
    current = policy.weight_version(timeout_s=timeout_s)
    if version is not None and current == version:
        return current
    return push_weights(policy, model, version if version is not None and current < version else current + 1, timeout_s)


def push_weights(
    policy: PolicyClient,
    model: torch.nn.Module,
    version: int,
    timeout_s: float | None = None,
    tries: int = 3,
    *,
    base: bool = False,
) -> int:
    """Push `model`'s weights as `version` (the target version, `version=` on the admin routes: the
    server serves them as that, and takes them only above what it serves); returns it.

    The client does not resend a push whose answer was lost (the server killed mid-upload, say): it
    may have landed. The server's version, read once it answers again, says what happened, with the
    trainer as its only writer: at `version` (after a lost answer, or a 409 when a push of it landed
    already): the push landed, and is not sent again; below it: it did not land, or the server
    restarted from its start-up checkpoint (versions count from 0 again), and the same push is sent
    again, which a restarted server takes directly; above it: another writer pushed, and the run
    stops (Conflict).

    A LoRA model pushes its adapter only (`lora.adapter`), which the server merges into its base;
    `base`: its base weights instead, in full (`lora.base_state`), which the server then merges into."""
    send = _sender(policy, model, timeout_s, base)
    refused: Conflict | Unavailable
    for _ in range(tries):
        try:
            return send(version).weight_version
        except Conflict as err:
            refused = err
        except Unavailable as err:
            if not err.unanswered:
                raise
            refused = err
        current = policy.weight_version(timeout_s=timeout_s)
        if current == version:
            return current
        if current > version:
            raise Conflict(
                f"the policy server is at weight_version {current}, past the {version} this trainer "
                "pushed: another writer is pushing weights",
                status=409,
            ) from refused
    raise refused


def _sender(
    policy: PolicyClient, model: torch.nn.Module, timeout_s: float | None, base: bool
) -> Callable[[int], WeightUpdateResponse]:
    """One push of `model` as a version: its adapter when it is a LoRA model (its base with `base`),
    else its state dict."""
    if base:
        state = lora.base_state(model)
        return lambda version: policy.update_weights(state, version=version, timeout_s=timeout_s)
    if lora.is_lora(model):
        tensors, alpha, r, fifo = lora.adapter(model)
        return lambda version: policy.update_adapter(
            tensors, lora_alpha=alpha, r=r, fan_in_fan_out=fifo, version=version, timeout_s=timeout_s
        )
    state = cpu_state(model)  # float32 master weights; a server in another dtype casts them
    return lambda version: policy.update_weights(state, version=version, timeout_s=timeout_s)


# --- the loop ------------------------------------------------------------------------------------


def run(
    ctx: Run,
    algorithm: str,
    step_fn: StepFn,
    modules: Mapping[str, torch.nn.Module],
    optimizers: Mapping[str, torch.optim.Optimizer],
    *,
    resume: bool = False,
    on_step: OnStep | None = None,
) -> list[dict[str, Any]]:
    """GRPO's and PPO's run: resume, check the reward ids, make the server hold the trainer's
    weights, then `steps` with held-out evaluation, `metrics.jsonl` and checkpoints after each.

    `modules` and `optimizers` (by name; `modules["policy"]` is the model) are what a checkpoint
    holds, with the ids of the training reward and of the evaluation's rewards: a resumed run
    whose rewards now answer with other ids stops (RewardMismatch). `config.json` records them,
    the config, where the prompts come from (`ctx.prompts.describe()`) and the memory the modules
    and optimizers hold (`trainer.models.sizes`, also printed at the start)."""
    config, run_dir = ctx.config, ctx.run_dir
    if not resume and RunDir.found_in(run_dir.path):
        raise RunExists(
            f"{run_dir.path} already holds a run: resume it, or clear it first (RunDir.clear), "
            "since two runs in one directory would mix their metrics"
        )
    start, reward_id, eval_ids = 1, None, {}
    if resume and (ckpt := run_dir.latest()) is not None:
        state = run_dir.load(ckpt, modules, optimizers)
        start, reward_id, eval_ids = state["step"] + 1, state["reward_id"], state.get("eval_reward_ids", {})
    elif resume:  # killed before its first checkpoint: it starts again at step 1, so its lines go
        run_dir.clear()
    where = f"resuming {run_dir.path}"
    reward_id = same_reward(reward_id_of(ctx.reward_fn), reward_id, where)
    eval_ids = {
        name: same_reward(current, eval_ids.get(name), f"{where}, eval reward {name!r}")
        for name, current in ctx.evaluation.reward_ids().items()
    }
    described = {**ctx.prompts.describe(), "reward_id": reward_id, "eval_reward_ids": eval_ids}
    memory = sizes(modules, config.hardware, trained=tuple(optimizers))  # before the first step: what it holds
    print("\n".join(memory), flush=True)
    run_dir.write_config({"algorithm": algorithm, **asdict(config), **described, "memory": memory})
    if lora.is_lora(ctx.model):  # the base in full, once: adapter pushes merge into what the server holds
        current = ctx.policy.weight_version(timeout_s=config.service_timeout_s)
        push_weights(ctx.policy, ctx.model, current + 1, config.service_timeout_s, base=True)
    version = sync_weights(ctx.policy, ctx.model, None, config.service_timeout_s)  # the server now serves exactly these
    if config.eval_every and start == 1:  # where the run starts from, as step 0
        run_dir.log({"step": 0, **ctx.evaluation(ctx, version), "weight_version": version})

    def record(metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        if config.eval_every and (step % config.eval_every == 0 or step == config.steps):
            metrics.update(ctx.evaluation(ctx, metrics["weight_version"]))
        run_dir.log(metrics)
        if on_step is not None:
            on_step(metrics)
        if step % config.checkpoint_every == 0 or step == config.steps:
            state = {"reward_id": reward_id, "eval_reward_ids": eval_ids, "weight_version": metrics["weight_version"]}
            run_dir.save(step, modules, optimizers, state)

    history = steps(range(start, config.steps + 1), step_fn, version, record)
    if lora.is_lora(ctx.model):  # checkpoints hold the adapter; this is the policy anyone can serve
        lora.save_merged(ctx.model, ctx.tokenizer, run_dir.path / "merged")
    return history


def steps(numbers: Iterable[int], step_fn: StepFn, version: int, on_step: OnStep | None = None) -> list[dict[str, Any]]:
    """The loop every online algorithm runs on (GRPO and PPO through `run`, iterative DPO's rounds):
    `step_fn(n, version)` trains on samples from the weights at `version` and pushes the new ones
    (`push_weights`), reporting the version that serves them as `weight_version`, which the next
    step samples from; then `on_step(metrics)`. The steps' metrics, in order."""
    history = []
    for n in numbers:
        metrics = step_fn(n, version)
        version = metrics["weight_version"]
        history.append(metrics)
        if on_step is not None:
            on_step(metrics)
    return history


def rollout(
    ctx: Run,
    problems: Sequence[Prompt],
    n: int,
    *,
    seed: int,
    version: int,
    seconds: dict[str, float],
    tries: int = 3,
) -> tuple[list[list[Rollout]], list[float | None], int, int]:
    """Sync the server's weights, sample `n` per problem, score them: (groups, scores in group
    order, stale samples dropped, the version that sampled). When every sample is stale (the
    server restarted between the sync and the sampling), sync and sample again, `tries` in all."""
    config, stale = ctx.config, 0
    with timed(seconds, "rollout_s"):
        for _ in range(tries):
            version = sync_weights(ctx.policy, ctx.model, version, config.service_timeout_s)  # again after a restart
            groups, dropped = sample_groups(
                ctx.policy,
                problems,
                n,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                seed=seed,
                version=version,
                timeout_s=config.service_timeout_s,
            )
            stale += dropped
            if any(groups):
                break
    with timed(seconds, "reward_s"):
        scores = score(ctx.reward_fn, [r for g in groups for r in g])
    return groups, scores, stale, version


@contextmanager
def timed(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Add the block's wall time to `seconds[name]`."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
