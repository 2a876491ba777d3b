"""The prompts an online run trains on: the arithmetic world (the default) or a user's dataset.

A `Prompt` is what one rollout starts from: the text the policy continues, and what travels to
the reward with the completion (the reference, the conversation, the row's other columns). A
source's `draw(step, count, seed)` is a pure function of its arguments, so a resumed run sees the
same prompts at the same step as the run it continues.

- `ArithPrompts`: training problems of the embedded world, as the trainer has always drawn them
  (`world.take("train", ...)` seeded by (seed, step)); never the held-out split.
- `DatasetPrompts`: the rows of a prompts file (`assay.data.load_prompts`). A prompt given as chat
  messages is rendered with the POLICY's chat template (`assay.chat.render_prompt`) for generation,
  and the conversation itself goes to the reward (`Prompt.messages`), so a reward model with its
  own tokenizer and template scores the conversation rather than the policy's rendering of it.
  Steps walk through the rows in epochs, each epoch in its own seeded order: every row is used
  once per epoch, and the step's rows depend only on (seed, step).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Protocol

from assay.arith import world
from assay.chat import render_prompt
from assay.data import DataError, Message, PromptRow, Text, load_demonstrations, load_prompts, split


@dataclass(frozen=True)
class Prompt:
    """One training (or evaluation) prompt."""

    text: str  # what the policy server continues: messages already rendered with the policy's template
    reference: str | None = None  # for rewards that compare against one (`correct`); None: the row has none
    messages: list[Message] | None = None  # the conversation `text` renders, sent to the reward as is
    metadata: dict[str, Any] = field(default_factory=dict)  # the row's other columns, sent to the reward


class PromptSource(Protocol):
    def draw(self, step: int, count: int, seed: int) -> list[Prompt]:
        """The `count` prompts of step `step` (from 1): a pure function of the arguments."""
        ...

    def describe(self) -> dict[str, Any]:
        """What config.json records about the prompts (where they come from, how many)."""
        ...


def from_problem(problem: world.Problem) -> Prompt:
    return Prompt(problem.prompt, str(problem.answer))


def completion_prompt(tokenizer: Any, prompt: Text) -> str:
    """`prompt` as the text to send as a completion prompt: chat messages rendered with the
    tokenizer's template. Encoding a completion prompt adds the tokenizer's special tokens (the
    policy server's, and `trainer.sft.encode_example`), so a template's own leading bos (Llama's
    `{{ bos_token }}`) is dropped here rather than doubled there."""
    text = render_prompt(tokenizer, prompt)
    bos = tokenizer.bos_token
    if (
        isinstance(prompt, list)
        and bos
        and text.startswith(bos)
        and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]
    ):
        return text[len(bos) :]
    return text


def from_rows(rows: list[PromptRow], tokenizer: Any) -> list[Prompt]:
    """The rows of a prompts file as Prompts, chat messages rendered with `tokenizer`'s template."""
    return [
        Prompt(
            completion_prompt(tokenizer, row.prompt),
            row.reference,
            row.prompt if isinstance(row.prompt, list) else None,
            dict(row.extra),
        )
        for row in rows
    ]


class ArithPrompts:
    """Training problems of the embedded arithmetic world."""

    def draw(self, step: int, count: int, seed: int) -> list[Prompt]:
        rng = random.Random(seed * 1_000_003 + step)
        return [from_problem(p) for p in world.take("train", count, seed=rng.randrange(2**31))]

    def describe(self) -> dict[str, Any]:
        return {"data": "arith"}


@dataclass
class DatasetPrompts:
    """The prompts of a file, `count` per step, each row once per epoch."""

    path: str
    prompts: list[Prompt]
    skipped: int = 0  # bad rows left out with --skip-bad-rows (the command reported each)

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError(f"{self.path} holds no usable prompt rows")

    def draw(self, step: int, count: int, seed: int) -> list[Prompt]:
        n, first = len(self.prompts), (step - 1) * count  # steps count from 1
        orders = {epoch: self._order(epoch, seed) for epoch in range(first // n, (first + count - 1) // n + 1)}
        return [self.prompts[orders[i // n][i % n]] for i in range(first, first + count)]

    def _order(self, epoch: int, seed: int) -> list[int]:
        order = list(range(len(self.prompts)))
        random.Random(seed * 1_000_003 + 7_919 * epoch + 1).shuffle(order)
        return order

    def describe(self) -> dict[str, Any]:
        return {"data": self.path, "data_rows": len(self.prompts), "data_skipped_rows": self.skipped}


@dataclass
class PromptFiles:
    """What `load_prompt_files` read: the training prompts, the eval set, the bad rows skipped."""

    train: DatasetPrompts
    eval: list[Prompt]  # empty: no eval set
    skipped: list[DataError]


def load_prompt_files(
    tokenizer: Any,
    data: str,
    *,
    eval_data: str | None = None,
    eval_fraction: float = 0.0,
    seed: int = 0,
    reference_key: str | None = None,
    skip_bad_rows: bool = False,
) -> PromptFiles:
    """The prompts of `data` and an eval set: the prompts of `eval_data`, or `eval_fraction` of
    `data`'s rows held out (`assay.data.split` with `seed`), or none. A malformed row raises
    DataError naming the file, the row and the column, unless `skip_bad_rows`: then it is left out
    and reported in `skipped`, never dropped silently."""
    if eval_data is not None and eval_fraction:
        raise ValueError(
            "give an eval set (--eval-data) or a share of the data to hold out (--eval-fraction), not both"
        )
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    loaded = load_prompts(data, reference_key=reference_key, skip_bad_rows=skip_bad_rows)
    rows, skipped = loaded.rows, list(loaded.skipped)
    eval_rows: list[PromptRow] = []
    if eval_fraction:
        rows, eval_rows = split(rows, eval_fraction, seed)
    elif eval_data is not None:
        held = load_prompts(eval_data, reference_key=reference_key, skip_bad_rows=skip_bad_rows)
        eval_rows, skipped = held.rows, skipped + list(held.skipped)
    train = DatasetPrompts(str(data), from_rows(rows, tokenizer), skipped=len(loaded.skipped))
    return PromptFiles(train, from_rows(eval_rows, tokenizer), skipped)


def load_ptx_data(
    tokenizer: Any, path: str, *, skip_bad_rows: bool = False
) -> tuple[list[tuple[str, str]], list[DataError]]:
    """PPO-ptx demonstrations from a file (`assay.data.load_demonstrations`) as the policy reads
    them: (prompt rendered with its chat template, the completion's text); and the rows skipped."""
    loaded = load_demonstrations(path, skip_bad_rows=skip_bad_rows)
    return [(completion_prompt(tokenizer, r.prompt), _content(r.completion)) for r in loaded.rows], list(loaded.skipped)


def _content(completion: Text) -> str:
    """A completion's text: the string, or its messages' contents (what the policy generates
    after the template's generation prompt, the end of turn being the eos the trainer appends)."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)
