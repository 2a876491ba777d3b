"""What the online algorithms are configured by in common, so each algorithm's file adds only its own fields.

    OnlineConfig   GRPO, PPO and iterative DPO: the reward by name, how rollouts (or searches) are
                   sampled, gradient clipping, the seed, and the deadline of every call to the services
    RLConfig       GRPO and PPO: a number of steps, checkpoints, held-out evaluation

Each field carries its help string (`metadata["help"]`): the command line's options and their help
derive from these dataclasses (`assay train grpo --help`). A field whose default differs between
algorithms (the learning rate, the KL coefficient, prompts per step) stays in the algorithm's own
config, where its meaning is stated. Validation happens on construction, with errors that say what
to change; subclasses extend `__post_init__`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SERVICE_TIMEOUT_S = 300.0  # long enough for a killed service to come back on a busy machine (it loads in 5-60 s)


@dataclass
class OnlineConfig:
    reward: str = field(default="correct", metadata={"help": "the rm_server reward to train on, by name (the run "
                                                             "records its reward id)"})  # fmt: skip
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature of the rollouts (DPO: of the "
                                                              "searches)"})  # fmt: skip
    max_tokens: int = field(default=48, metadata={"help": "tokens per completion, at most"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (PPO: of the actor and of the critic)"})
    seed: int = field(default=0, metadata={"help": "the run's seed: torch's, and the prompts, sampling and shuffling "
                                                   "seeds of each step derive from it"})  # fmt: skip
    service_timeout_s: float = field(default=SERVICE_TIMEOUT_S, metadata={"help": "deadline (s) of each call to "
                                     "rm_server or policy_server, retries included: a service killed and restarted "
                                     "within it costs the run only the wait"})  # fmt: skip

    def __post_init__(self) -> None:
        if not self.service_timeout_s > 0:
            raise ValueError(f"service_timeout_s must be > 0, got {self.service_timeout_s}")
        if self.max_tokens < 1 or self.temperature < 0 or self.grad_clip <= 0:
            raise ValueError(f"max_tokens must be >= 1, temperature >= 0 and grad_clip > 0; got {self.max_tokens}, "
                             f"{self.temperature} and {self.grad_clip}")  # fmt: skip


@dataclass
class RLConfig(OnlineConfig):
    steps: int = field(default=100, metadata={"help": "optimisation steps (each: one rollout batch)"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between checkpoints"})
    eval_every: int = field(default=0, metadata={"help": "steps between held-out pass@1 evaluations (0: none)"})
    eval_problems: int = field(default=64, metadata={"help": "held-out problems per evaluation"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.steps, self.checkpoint_every, self.eval_problems) < 1 or self.eval_every < 0:
            raise ValueError("steps, checkpoint_every and eval_problems must be >= 1, eval_every >= 0")
