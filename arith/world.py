"""The embedded arithmetic world: multi-step problems with shown work.

A problem is a chain of additions and subtractions evaluated left to right, and its worked
solution shows one equation per step, then the final answer:

    prompt:   "Q: 23+45-17 A: "
    response: "23+45=68 68-17=51 #### 51"

Problems come from a seeded generator. Every problem belongs to exactly one split, decided by a
stable hash of its expression, so no held-out problem is ever trained on, whatever the seed.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

PROMPT_PREFIX = "Q: "
PROMPT_SUFFIX = " A: "
ANSWER_MARK = "####"

SPLITS = ("train", "heldout")
HELDOUT_PERCENT = 10  # share of the problem space that only evaluation ever sees


@dataclass(frozen=True)
class Level:
    """How hard a problem is: how many operands and how large they are."""

    min_operands: int
    max_operands: int
    min_value: int
    max_value: int

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError("a level needs 2 <= min_operands <= max_operands")
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError("a level needs 0 <= min_value <= max_value")


# Level 2 is the world's default: the checkpoints are trained and evaluated on it.
LEVELS: dict[int, Level] = {
    1: Level(2, 2, 1, 20),
    2: Level(3, 3, 10, 99),
    3: Level(3, 4, 10, 99),
    4: Level(4, 5, 10, 99),
    5: Level(4, 6, 100, 999),
}
DEFAULT_LEVEL = 2


@dataclass(frozen=True)
class Problem:
    """One problem: its operands and the operators between them."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]  # len(ops) == len(operands) - 1, each "+" or "-"

    @property
    def expression(self) -> str:
        """`23+45-17`"""
        parts = [str(self.operands[0])]
        for op, x in zip(self.ops, self.operands[1:]):
            parts.append(f"{op}{x}")
        return "".join(parts)

    @property
    def prompt(self) -> str:
        """The text the policy is asked to continue: `Q: 23+45-17 A: `."""
        return f"{PROMPT_PREFIX}{self.expression}{PROMPT_SUFFIX}"

    def running_values(self) -> list[int]:
        """The value after each step, left to right: [68, 51] for 23+45-17."""
        values, acc = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            acc = apply(op, acc, x)
            values.append(acc)
        return values

    @property
    def answer(self) -> int:
        return self.running_values()[-1]

    def steps(self) -> list[str]:
        """The correct shown work: ["23+45=68", "68-17=51"]."""
        out, acc = [], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            nxt = apply(op, acc, x)
            out.append(f"{acc}{op}{x}={nxt}")
            acc = nxt
        return out

    @property
    def solution(self) -> str:
        """The reference response: `23+45=68 68-17=51 #### 51`."""
        return " ".join(self.steps()) + f" {ANSWER_MARK} {self.answer}"

    @property
    def split(self) -> str:
        return split_of(self.expression)


def apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    raise ValueError(f"unknown operator {op!r}")


def split_of(expression: str) -> str:
    """The split a problem belongs to, from a stable hash of its expression."""
    digest = hashlib.sha256(expression.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT else "train"


def parse_prompt(prompt: str) -> Problem:
    """Recover the problem from its prompt (or its bare expression); ValueError if malformed."""
    text = prompt.strip()
    if text.startswith(PROMPT_PREFIX.strip()):
        text = text[len(PROMPT_PREFIX.strip()) :]
    if text.endswith(PROMPT_SUFFIX.strip()):
        text = text[: -len(PROMPT_SUFFIX.strip())]
    text = text.strip()
    operands: list[int] = []
    ops: list[str] = []
    number = ""
    for ch in text:
        if ch.isdigit():
            number += ch
        elif ch in "+-" and number:
            operands.append(int(number))
            ops.append(ch)
            number = ""
        else:
            raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    if not number or not ops:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    operands.append(int(number))
    return Problem(tuple(operands), tuple(ops))


def sample_problem(rng: random.Random, level: Level) -> Problem:
    n = rng.randint(level.min_operands, level.max_operands)
    operands = tuple(rng.randint(level.min_value, level.max_value) for _ in range(n))
    ops = tuple(rng.choice("+-") for _ in range(n - 1))
    return Problem(operands, ops)


def problems(split: str, seed: int, level: int = DEFAULT_LEVEL) -> Iterator[Problem]:
    """An endless, deterministic stream of distinct problems of one split and level."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}, not {level!r}")
    rng = random.Random(f"arith/{split}/{level}/{seed}")
    seen: set[str] = set()
    while True:
        p = sample_problem(rng, LEVELS[level])
        if p.split == split and p.expression not in seen:
            seen.add(p.expression)
            yield p


def take(split: str, n: int, seed: int, level: int = DEFAULT_LEVEL) -> list[Problem]:
    """The first n problems of a split's stream."""
    stream = problems(split, seed, level)
    return [next(stream) for _ in range(n)]


# The fixed held-out set that `assay eval` reports on.
EVAL_SEED = 1234


def eval_problems(n: int) -> list[Problem]:
    return take("heldout", n, seed=EVAL_SEED)
