"""The trainer's configs: one base for the online algorithms, each algorithm adding only its own fields.

    OnlineConfig   GRPO, PPO and iterative DPO: the reward by name, how rollouts (or searches) are
                   sampled, gradient clipping, the seed, and the deadline of every call to the services
    RLConfig       GRPO and PPO: a number of steps, checkpoints, held-out evaluation
    GRPOConfig, PPOConfig, DPOConfig   each algorithm's own fields (trainer/grpo.py, ppo.py, dpo.py)

Each field carries its help string (`metadata["help"]`): `assay train grpo|ppo|dpo` derives its
options, their defaults and help from these dataclasses (`assay.cli_options`), so a default lives
in one place. They sit together here, not in each algorithm's file, because this module imports
no torch: the command line reads them, and refuses a bad value, before anything heavy is loaded.
A field whose default differs between algorithms (the learning rate, the KL coefficient, prompts
per step) stays in the algorithm's own config, where its meaning is stated. Validation happens on
construction, with errors that say what to change; subclasses extend `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

SERVICE_TIMEOUT_S = 300.0  # long enough for a killed service to come back on a busy machine (it loads in 5-60 s)


@dataclass
class Hardware:
    """Where and in what precision the trainer's models (actor, reference, critic) run."""

    device: str = field(
        default="cpu", metadata={"help": "torch device of the trainer's models: cpu, cuda, cuda:1, ..."}
    )
    dtype: Literal["float32", "bfloat16", "float16"] = field(
        default="float32",
        metadata={
            "help": "compute dtype: bfloat16 or float16 run forward and backward under autocast, while the "
            "weights and the optimizer state stay float32"
        },
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations in the backward pass: less memory, more compute"}
    )
    attn_implementation: str = field(
        default="auto", metadata={"help": "eager, sdpa, flash_attention_2, ... (auto: transformers' choice)"}
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, not {self.dtype!r}")
        if not self.device or not self.attn_implementation:
            raise ValueError("device and attn_implementation must not be empty")


@dataclass
class LoRA:
    """A LoRA adapter (the `peft` library) trained in place of the full weights; r = 0: no adapter."""

    r: int = field(default=0, metadata={"flag": "lora-r", "help": "LoRA rank (0: train the full weights)"})
    alpha: float = field(
        default=16.0, metadata={"flag": "lora-alpha", "help": "LoRA alpha (the update is scaled by alpha / r)"}
    )
    dropout: float = field(default=0.0, metadata={"flag": "lora-dropout", "help": "dropout on the LoRA input"})
    target_modules: tuple[str, ...] = field(
        default=("all-linear",),
        metadata={
            "flag": "lora-target",
            "help": "module names the adapter wraps, repeatable (all-linear: every linear layer but the output head)",
        },
    )

    def __post_init__(self) -> None:
        if self.r < 0 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ValueError(
                f"lora r must be >= 0, alpha > 0 and dropout in [0, 1); got {self.r}, {self.alpha}, {self.dropout}"
            )
        if self.r and not self.target_modules:
            raise ValueError("lora target_modules must name at least one module")


@dataclass
class OnlineConfig:
    reward: str = field(
        default="correct",
        metadata={"help": "the rm_server reward to train on, by name (the run records its reward id)"},
    )
    temperature: float = field(
        default=1.0, metadata={"help": "sampling temperature of the rollouts (DPO: of the searches)"}
    )
    max_tokens: int = field(default=48, metadata={"help": "tokens per completion, at most"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (PPO: of the actor and of the critic)"})
    seed: int = field(
        default=0,
        metadata={
            "help": "the run's seed: torch's, and the prompts, sampling and shuffling seeds of each step derive from it"
        },
    )
    hardware: Hardware = field(default_factory=Hardware, metadata={"help": "Device and precision"})
    lora: LoRA = field(default_factory=LoRA, metadata={"help": "LoRA"})
    service_timeout_s: float = field(
        default=SERVICE_TIMEOUT_S,
        metadata={
            "help": "deadline (s) of each call to "
            "rm_server or policy_server, retries included: a service killed and restarted "
            "within it costs the run only the wait"
        },
    )

    def __post_init__(self) -> None:
        if not self.service_timeout_s > 0:
            raise ValueError(f"service_timeout_s must be > 0, got {self.service_timeout_s}")
        if self.max_tokens < 1 or self.temperature < 0 or self.grad_clip <= 0:
            raise ValueError(
                f"max_tokens must be >= 1, temperature >= 0 and grad_clip > 0; got {self.max_tokens}, "
                f"{self.temperature} and {self.grad_clip}"
            )


@dataclass
class RLConfig(OnlineConfig):
    steps: int = field(default=100, metadata={"help": "optimisation steps (each: one rollout batch)"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(
        default=0,
        metadata={
            "help": "steps between evaluations, also run at step 0 "
            "(0: none; with an eval set: at the start and the end)"
        },
    )
    eval_problems: int = field(
        default=64, metadata={"help": "held-out problems per evaluation (with an eval set: its first rows, at most)"}
    )
    eval_samples: int = field(default=4, metadata={"help": "with an eval set: completions per eval prompt (T=1.0)"})
    eval_pass_reward: str = field(
        default="auto",
        metadata={
            "help": "with an eval set: a rule reward (1/0 against the reference) whose pass rate is logged beside "
            "the training reward's mean; auto: the served rule.math_equal (else rule.exact_match) reward, if any; "
            "none: no pass rate"
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.steps, self.checkpoint_every, self.eval_problems) < 1 or self.eval_every < 0:
            raise ValueError("steps, checkpoint_every and eval_problems must be >= 1, eval_every >= 0")
        if self.eval_samples < 1:
            raise ValueError(f"eval_samples must be >= 1, got {self.eval_samples}")


@dataclass
class GRPOConfig(RLConfig):
    prompts_per_step: int = field(default=16, metadata={"help": "B: training prompts per step"})
    group_size: int = field(default=8, metadata={"help": "G: completions per prompt"})
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (constant)"})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (0: no reference model)"})
    eps_low: float = field(default=0.2, metadata={"help": "ratio clip below 1"})
    eps_high: float = field(default=0.2, metadata={"help": "ratio clip above 1 (DAPO's clip-higher: 0.28)"})
    mu: int = field(default=1, metadata={"help": "optimisation passes over each rollout batch"})
    scale: str = field(default="std", metadata={"help": "advantage scaling: std (GRPO), none (Dr. GRPO), batch"})
    loss_norm: str = field(
        default="sequence_mean", metadata={"help": "sequence_mean, token_mean (DAPO), constant (Dr. GRPO)"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.prompts_per_step, self.mu) < 1 or self.group_size < 2:
            raise ValueError("prompts_per_step and mu must be >= 1, group_size >= 2")
        if self.scale not in ("std", "none", "batch"):
            raise ValueError(f"scale must be std, none or batch, not {self.scale!r}")
        if self.loss_norm not in ("sequence_mean", "token_mean", "constant"):
            raise ValueError(f"loss_norm must be sequence_mean, token_mean or constant, not {self.loss_norm!r}")
        if self.lr <= 0 or self.beta < 0 or self.eps_low <= 0 or self.eps_high <= 0:
            raise ValueError("lr, eps_low and eps_high must be > 0, beta >= 0")


@dataclass
class PPOConfig(RLConfig):
    prompts_per_step: int = field(default=32, metadata={"help": "B: training prompts per step"})
    samples_per_prompt: int = field(default=4, metadata={"help": "completions per prompt"})
    lr: float = field(default=1e-4, metadata={"help": "actor AdamW learning rate"})
    critic_lr: float = field(default=1e-4, metadata={"help": "critic AdamW learning rate"})
    beta: float = field(default=0.05, metadata={"help": "per-token KL penalty folded into the reward"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    eps: float = field(default=0.2, metadata={"help": "policy ratio clip"})
    eps_value: float = field(default=0.2, metadata={"help": "value clip around the rollout's values"})
    c1: float = field(default=0.5, metadata={"help": "value loss coefficient"})
    gamma_ptx: float = field(default=0.0, metadata={"help": "PPO-ptx: weight of the SFT log-likelihood term (0: off)"})
    ptx_batch: int = field(default=16, metadata={"help": "SFT examples per ptx term"})
    epochs: int = field(default=2, metadata={"help": "optimisation passes over each rollout batch"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.prompts_per_step, self.samples_per_prompt, self.epochs) < 1:
            raise ValueError("prompts_per_step, samples_per_prompt and epochs must be >= 1")
        if self.lr <= 0 or self.critic_lr <= 0 or self.eps <= 0 or self.beta < 0 or self.gamma_ptx < 0:
            raise ValueError("lr, critic_lr and eps must be > 0; beta and gamma_ptx >= 0")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError("gamma and lam must be in [0, 1]")


# Strategies whose answer lists every sampled candidate with its own reward score.
PAIR_STRATEGIES = ("best_of_n", "weighted_best_of_n")


@dataclass
class DPOConfig(OnlineConfig):
    reward: str = field(default="orm", metadata={"help": "the rm_server reward that scores the candidates, by name"})
    beta: float = field(
        default=0.1,
        metadata={
            "help": "inverse temperature of the implicit reward; larger "
            "keeps the policy closer to the reference (iterative runs against the ORM needed "
            "0.5: at 0.1 the policy drifts toward what the ORM cannot see)"
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "cDPO: assumed share of flipped preference labels (0 = plain DPO)"}
    )
    sft_weight: float = field(
        default=0.0,
        metadata={"help": "RPO: weight of the per-token NLL of the chosen response added to the loss (0 = plain DPO)"},
    )
    lr: float = field(default=3e-5, metadata={"help": "AdamW learning rate (constant)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=16, metadata={"help": "pairs per optimizer step"})
    epochs: int = field(default=2, metadata={"help": "passes over the pairs (offline: in all; iterative: per round)"})
    # iterative DPO only
    rounds: int = field(default=5, metadata={"help": "search -> train -> push rounds"})
    prompts_per_round: int = field(default=32, metadata={"help": "training prompts searched per round"})
    n: int = field(default=8, metadata={"help": "candidates sampled per prompt"})
    strategy: str = field(default="best_of_n", metadata={"help": f"search strategy, one of {PAIR_STRATEGIES}"})
    min_margin: float = field(
        default=0.0,
        metadata={"help": "skip a prompt whose top-bottom score gap is below this (equal scores are always skipped)"},
    )
    ref_update: Literal["fixed", "each_round"] = field(
        default="fixed",
        metadata={"help": "reference model: the initial policy throughout, or the policy at the start of each round"},
    )
    concurrency: int = field(default=4, metadata={"help": "searches in flight at once"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError("label_smoothing must be in [0, 0.5): at 0.5 the labels carry no preference")
        if self.sft_weight < 0 or self.lr <= 0:
            raise ValueError("sft_weight must be >= 0, lr > 0")
        if min(self.batch_size, self.epochs, self.rounds, self.prompts_per_round, self.concurrency) < 1:
            raise ValueError("batch_size, epochs, rounds, prompts_per_round and concurrency must be >= 1")
        if self.n < 2:
            raise ValueError(f"n must be >= 2 to have a chosen and a rejected candidate, got {self.n}")
        if self.strategy not in PAIR_STRATEGIES:
            raise ValueError(
                f"strategy must be one of {PAIR_STRATEGIES} (they score every candidate), not {self.strategy!r}"
            )
        if self.min_margin < 0:
            raise ValueError("min_margin must be >= 0")
        if self.ref_update not in ("fixed", "each_round"):
            raise ValueError("ref_update must be 'fixed' or 'each_round'")


# --- offline training: SFT and reward models (trainer/sft.py, trainer/reward_model.py) ----------------


@dataclass
class SFTConfig:
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "examples per step"})
    lr: float = field(default=1e-3, metadata={"help": "peak AdamW learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warm-up steps"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor, as share of lr"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm"})
    seed: int = field(default=0, metadata={"help": "torch seed for the run"})
    label_smoothing: float = field(default=0.0, metadata={"help": "share of target mass smoothed"})
    smoothing_tokens: str = field(
        default="", metadata={"help": "characters smoothed among themselves ('' = whole vocabulary)"}
    )
    hardware: Hardware = field(default_factory=Hardware, metadata={"help": "Device and precision"})

    def __post_init__(self) -> None:
        if not 0 <= self.label_smoothing < 1:
            raise ValueError("label_smoothing must be in [0, 1)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError("warmup_steps must be between 0 and steps")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


Loss = Literal["bt", "listwise", "margin"]  # bt: Bradley-Terry


@dataclass
class RMConfig(SFTConfig):
    loss: Loss = field(default="bt", metadata={"help": "ranking loss: bt (Bradley-Terry), listwise, margin"})
    margin: float = field(default=1.0, metadata={"help": "margin for the margin loss"})
    k: int = field(default=4, metadata={"help": "candidates per group for the listwise loss, at most"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss not in ("bt", "listwise", "margin"):
            raise ValueError(f"loss must be bt, listwise or margin, not {self.loss!r}")
        if self.k < 2:
            raise ValueError("k must be >= 2")
