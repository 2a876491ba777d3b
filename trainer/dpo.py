"""Direct Preference Optimization (Rafailov et al. 2023), offline and iterative.

DPO fits a policy to preference pairs (x, y_w, y_l) without a reward model in the loop: the
policy's log-ratio against a frozen reference *is* the reward, r(x, y) = beta * log pi(y|x)/pi_ref(y|x),
and the Bradley-Terry likelihood of the pairs is maximised directly:

    L = -log sigmoid(beta * ((log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))))

with log pi(y|x) summed over the completion's tokens only (prompt masked; the completion is the
response closed by eos, as `trainer.sft.encode_example` builds it). The reference is a frozen copy
of the starting policy, so beta bounds how far training may drift from it.

Iterative DPO ("search feeding learning"): each round, best-of-N search on the policy server
samples N candidates per training prompt and rm_server scores them by reward id; the top- and
bottom-scored candidates become (chosen, rejected); a few DPO epochs on those pairs; the new
weights are pushed back to the server, so the next round searches the trained policy. A candidate
whose score is None (the reward failed on it) is left out, never counted as 0; the run stops
if rm_server's id for the reward changes mid-run, since the pairs would then mix two rewards.

Both train on `config.hardware` (`trainer.models`: device, autocast over float32 weights, gradient
checkpointing); the reference is a float32 copy under the same autocast, and the log-probs are float32.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from assay.arith import world
from assay.trainer import lora, online
from assay.trainer.config import DPOConfig
from assay.trainer.models import Precision, device_of, out_of_memory, prepare, reference, sizes
from assay.trainer.online import RewardMismatch, push_weights, same_reward, sync_weights
from assay.trainer.sft import IGNORE, collate, encode_example

if TYPE_CHECKING:
    from assay.clients.policy import PolicyClient
    from assay.policy_server.protocol import SearchResponse


@dataclass
class Pair:
    """One preference: `chosen` preferred over `rejected` as responses to `prompt` (no eos in them)."""

    prompt: str
    chosen: str
    rejected: str
    chosen_score: float | None = None  # the reward's scores, when the pair came from a search
    rejected_score: float | None = None
    chosen_correct: bool | None = None  # against the search's reference, when one was sent
    rejected_correct: bool | None = None


# --- the loss ------------------------------------------------------------------------------


def sequence_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], completions: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """([batch] summed log pi(completion + eos | prompt), [batch] completion token counts)."""
    ids, _, labels = collate(
        [encode_example(tokenizer, p, c) for p, c in zip(prompts, completions)], tokenizer.pad_token_id
    )
    device = device_of(model)
    # Right padding under a causal mask: real tokens never attend to the pads after them (as in sft.py).
    logits = model(input_ids=ids.to(device), use_cache=False).logits[:, :-1].float()  # [batch, seq-1, vocab]
    target = labels[:, 1:].to(device)  # position t predicts token t + 1
    keep = target != IGNORE
    token_logp = logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)  # [batch, seq-1]
    return (token_logp * keep).sum(-1), keep.sum(-1)


def pair_logps(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over chosen and rejected together: ([B] log pi(y_w|x), [B] log pi(y_l|x), [B] |y_w|)."""
    prompts = [p.prompt for p in pairs] * 2
    logp, count = sequence_logps(model, tokenizer, prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    b = len(pairs)
    return logp[:b], logp[b:], count[:b]


def dpo_loss(
    pi_chosen: torch.Tensor,
    pi_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B] x 4 sequence log-probs -> (scalar loss, [B] chosen and [B] rejected implicit rewards).

    Implicit reward r = beta * (log pi(y|x) - log pi_ref(y|x)); DPO is Bradley-Terry on it:
        L = -log sigmoid(r_w - r_l)
    cDPO (label smoothing e) treats a share e of the labels as flipped:
        L = -(1 - e) log sigmoid(r_w - r_l) - e log sigmoid(r_l - r_w)
    """
    chosen_reward = beta * (pi_chosen - ref_chosen)  # [B]
    rejected_reward = beta * (pi_rejected - ref_rejected)  # [B]
    h = chosen_reward - rejected_reward  # [B]
    loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return loss.mean(), chosen_reward.detach(), rejected_reward.detach()


def make_optimizer(model: torch.nn.Module, config: DPOConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(lora.trainable(model), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))


def dpo_step(
    model: PreTrainedModel,
    ref_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    batch_pairs: Sequence[Pair],
    optimizer: torch.optim.Optimizer,
    config: DPOConfig,
    precision: Precision | None = None,
) -> dict[str, float]:
    """One optimizer step on a batch of pairs; metrics measured before the step (TRL's convention).
    `precision`: the run's (default: `config.hardware`'s, which a float16 run must not rebuild each step)."""
    precision = precision if precision is not None else Precision(config.hardware)
    model.train()
    with precision.autocast():
        pi_w, pi_l, n_w = pair_logps(model, tokenizer, batch_pairs)
        with torch.no_grad():
            ref_w, ref_l, _ = pair_logps(ref_model, tokenizer, batch_pairs)
        dpo, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta, config.label_smoothing)
        # RPO's anchor: per-token NLL of the chosen responses, so their likelihood need not fall
        nll = -(pi_w.sum() / n_w.sum())
        loss = dpo + config.sft_weight * nll if config.sft_weight else dpo
    (grad_norm,) = precision.step(loss, (optimizer, config.grad_clip))
    return {
        "loss": loss.item(),
        "dpo_loss": dpo.item(),
        "reward_accuracy": (r_w > r_l).float().mean().item(),
        "margin": (r_w - r_l).mean().item(),
        "chosen_reward": r_w.mean().item(),
        "rejected_reward": r_l.mean().item(),
        "chosen_logp": pi_w.detach().mean().item(),
        "rejected_logp": pi_l.detach().mean().item(),
        "grad_norm": grad_norm,
    }


def _train_epochs(
    model: PreTrainedModel,
    ref_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    optimizer: torch.optim.Optimizer,
    config: DPOConfig,
    rng: random.Random,
    precision: Precision,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    history: list[dict[str, float]] = []
    for _ in range(config.epochs):
        order = list(pairs)
        rng.shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            where = f"DPO step {len(history) + 1} (policy and reference forwards, backward over {len(batch)} pairs)"
            with out_of_memory(where, [f"--batch-size ({config.batch_size})"], config.hardware, resumable=False):
                history.append(dpo_step(model, ref_model, tokenizer, batch, optimizer, config, precision))
            if on_step:
                on_step(len(history) - 1, history[-1])
    model.eval()
    return history


def train_offline(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: DPOConfig,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    ref_model: PreTrainedModel | None = None,
) -> list[dict[str, float]]:
    """DPO in place, on `config.hardware`, on fixed pairs for `config.epochs` shuffled passes; the
    per-step metrics. The reference is a frozen copy of `model` as passed in, unless `ref_model` is
    given (on the same device: `trainer.models.reference` of the prepared model)."""
    if not pairs:
        raise ValueError("train_offline needs at least one pair")
    torch.manual_seed(config.seed)
    prepare(model, config.hardware)
    ref_model = ref_model if ref_model is not None else reference(model)
    optimizer, precision = make_optimizer(model, config), Precision(config.hardware)
    return _train_epochs(
        model, ref_model, tokenizer, pairs, optimizer, config, random.Random(config.seed), precision, on_step
    )


@torch.no_grad()
def evaluate_pairs(
    model: PreTrainedModel,
    ref_model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    config: DPOConfig,
) -> dict[str, float]:
    """Held-out DPO metrics over `pairs`: the loss, the implicit reward's accuracy (chosen above
    rejected) and its mean margin, in batches of `config.batch_size`. The model's mode is kept."""
    was_training = model.training
    model.eval()
    losses, accuracy, margin = [], [], []
    for start in range(0, len(pairs), config.batch_size):
        batch = pairs[start : start + config.batch_size]
        pi_w, pi_l, _ = pair_logps(model, tokenizer, batch)
        ref_w, ref_l, _ = pair_logps(ref_model, tokenizer, batch)
        loss, r_w, r_l = dpo_loss(pi_w, pi_l, ref_w, ref_l, config.beta, config.label_smoothing)
        losses.append(loss.item() * len(batch))
        accuracy.extend((r_w > r_l).float().tolist())
        margin.extend((r_w - r_l).tolist())
    model.train(was_training)
    n = len(pairs)
    return {"loss": sum(losses) / n, "reward_accuracy": sum(accuracy) / n, "margin": sum(margin) / n}


# --- iterative DPO: search feeding learning -------------------------------------------------


def pair_from_search(prompt: str, response: SearchResponse, min_margin: float = 0.0) -> Pair | None:
    """(top-scored, bottom-scored) candidates as a Pair; None when nothing separates them.

    Candidates the reward failed on (score None) are left out: a failure is not a low score.
    """
    scored = [(c.score, c) for c in response.candidates if c.score is not None]
    if len(scored) < 2:
        return None
    top_score, top = max(scored, key=lambda sc: sc[0])
    bottom_score, bottom = min(scored, key=lambda sc: sc[0])
    margin = top_score - bottom_score
    if margin <= 0 or margin < min_margin or top.text == bottom.text:
        return None
    return Pair(prompt, top.text, bottom.text, top_score, bottom_score, top.correct, bottom.correct)


def _check_train_split(prompts: Sequence[str]) -> None:
    for p in prompts:
        try:
            problem = world.parse_prompt(p)
        except ValueError:
            continue  # not an arithmetic prompt: its split is the caller's business
        if problem.split != "train":
            raise ValueError(f"{p!r} is a held-out evaluation problem; train on world.take('train', ...) prompts")


def iterative_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    policy: PolicyClient,
    config: DPOConfig,
    prompts: Sequence[str],
    on_round: Callable[[dict, list[Pair]], None] | None = None,
    *,
    references: Sequence[str | None] | None = None,
    expected_reward_id: str | None = None,
) -> list[dict]:
    """`config.rounds` rounds of search -> pairs -> DPO -> weight push; per-round metrics.

    The rounds are the steps of the online loop GRPO and PPO run on (`trainer.online.steps`): the
    server is made to hold the trainer's weights before each round's searches and is pushed the
    new ones after it (`sync_weights`, `push_weights`). `model` must hold the weights the server
    is serving when the run starts (the searches sample the served model, the gradient flows
    through the local one). Round r searches prompts r*prompts_per_round ... (cycling through
    `prompts`), with `references[i]` sent along when given (a reward like `correct` needs it; each
    candidate is then marked correct or not). The reference model is the initial policy
    (`ref_update="fixed"`) or the policy at the start of each round ("each_round"). The AdamW state
    carries over between rounds. Raises RewardMismatch when a search is scored by a different
    reward id than the first one (or than `expected_reward_id`, rm_server's id for the reward).

    With `config.lora.r`, `model` comes wrapped (`lora.wrap`, so the caller holds the wrapped
    model): the adapter trains, the reference is the base, and each push sends the adapter alone.
    """
    if not prompts:
        raise ValueError("iterative_dpo needs at least one prompt")
    if references is not None and len(references) != len(prompts):
        raise ValueError("references must have one entry per prompt")
    _check_train_split(prompts)
    if bool(config.lora.r) != lora.is_lora(model):
        raise ValueError("with lora r > 0, pass the policy wrapped (`lora.wrap(model, config.lora)`), else unwrapped")
    if config.lora.r and config.ref_update != "fixed":
        raise ValueError("a LoRA policy's reference is its base (ref_update 'fixed'): 'each_round' needs full weights")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    prepare(model, config.hardware)
    ref_model = lora.Reference(model) if lora.is_lora(model) else reference(model)
    optimizer, precision = make_optimizer(model, config), Precision(config.hardware)
    held = {"policy": model, **({"reference": ref_model} if not lora.is_lora(model) else {})}
    print("\n".join(sizes(held, config.hardware)), flush=True)
    reward_id = expected_reward_id
    timeout_s = config.service_timeout_s

    def one_round(r: int, version: int) -> dict:
        nonlocal reward_id
        t0 = time.perf_counter()
        version = sync_weights(policy, model, version, timeout_s)  # pushed again if the server restarted
        idx = [(r * config.prompts_per_round + i) % len(prompts) for i in range(config.prompts_per_round)]

        def search(i: int, k: int) -> SearchResponse:
            return policy.search(
                prompts[i],
                strategy=config.strategy,
                n=config.n,
                reward=config.reward,
                reference=references[i] if references is not None else None,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                seed=config.seed * 1_000_003 + r * config.prompts_per_round + k,
            )

        responses = list(pool.map(search, idx, range(len(idx))))
        reward_id = _same_reward_id(responses, reward_id, config.reward, r)  # before any pair is trained on
        built = [pair_from_search(prompts[i], resp, config.min_margin) for i, resp in zip(idx, responses)]
        pairs = [p for p in built if p is not None]
        t_search = time.perf_counter() - t0

        if config.ref_update == "each_round":
            ref_model.load_state_dict(model.state_dict())
        steps = _train_epochs(model, ref_model, tokenizer, pairs, optimizer, config, rng, precision) if pairs else []
        t_train = time.perf_counter() - t0 - t_search
        if steps:  # nothing trained, nothing to push
            version = push_weights(policy, model, version + 1, timeout_s)

        metrics = {
            "round": r,
            "prompts": len(idx),
            "pairs": len(pairs),
            "mean_chosen_score": _mean([p.chosen_score for p in pairs if p.chosen_score is not None]),
            "mean_rejected_score": _mean([p.rejected_score for p in pairs if p.rejected_score is not None]),
            "chosen_correct": _mean([p.chosen_correct for p in pairs if p.chosen_correct is not None]),
            "rejected_correct": _mean([p.rejected_correct for p in pairs if p.rejected_correct is not None]),
            # the weights that generated this round's pairs
            "search_weight_version": min(
                (s.weight_version for s in responses if s.weight_version is not None), default=None
            ),
            "steps": len(steps),
            "loss": _mean([s["loss"] for s in steps]),
            "reward_accuracy": _mean([s["reward_accuracy"] for s in steps]),
            "margin": _mean([s["margin"] for s in steps]),
            "weight_version": version,
            "reward_id": reward_id,
            "search_seconds": round(t_search, 2),
            "train_seconds": round(t_train, 2),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        if on_round:
            on_round(metrics, pairs)
        return metrics

    with ThreadPoolExecutor(config.concurrency) as pool:
        return online.steps(range(config.rounds), one_round, policy.weight_version(timeout_s=timeout_s))


def _same_reward_id(responses: Sequence[SearchResponse], reward_id: str | None, reward: str, r: int) -> str:
    """The run's reward id (the first search's, unless one was expected); RewardMismatch on any other."""
    for resp in responses:
        if resp.reward_id is None:
            raise RewardMismatch(
                f"round {r}: the search answered with no reward id; is {reward!r} a reward "
                "of rm_server, and does the strategy use it?"
            )
        reward_id = same_reward(resp.reward_id, reward_id, f"round {r}, reward {reward!r}")
    assert reward_id is not None
    return reward_id


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None
