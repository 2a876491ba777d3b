"""`assay eval`'s settings and targets, light to import: the command checks its options before torch loads."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from assay.arith import CHECKPOINTS

KS = (1, 4, 16, 64)
TARGETS = {
    "pass@1": (0.20, 0.60),
    "pass@16": (0.85, 1.0),
    "orm_pairwise_accuracy": (0.80, 1.0),
    "verifier_accuracy": (0.75, 1.0),
}


@dataclass
class EvalConfig:
    problems: int = field(default=128, metadata={"help": "held-out problems"})
    samples: int = field(default=64, metadata={"help": "policy samples per problem (>= max k)"})
    scored: int = field(default=16, metadata={"help": "samples per problem scored by the RMs"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    checkpoints: Path = field(default=CHECKPOINTS, metadata={"help": "folder holding the four checkpoints"})
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.samples < max(KS):
            raise ValueError(f"samples must be >= {max(KS)} to estimate pass@{max(KS)}")
        if not 1 <= self.scored <= self.samples:
            raise ValueError("scored must be between 1 and samples")
