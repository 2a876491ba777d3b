"""Rule rewards: deterministic checks of a response, one class per `rule.*` spec type.

A rule answers 1.0 (pass) or 0.0 (fail), and a failed check is a real answer, not an error. A
rule returns an `ItemFailure` only when it cannot judge: a missing reference, a prompt that is
not an arithmetic problem, math-verify running out of time.

All rules but math_equal are cheap and judge inline on the event loop. math_equal runs
math-verify (sympy) in a pool of worker processes (`mathpool.py`), where its `signal.alarm`
timeouts work.
"""

from __future__ import annotations

import json
import math
import re
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import jsonschema

from assay.arith.checks import step_labels
from assay.arith.world import parse_prompt
from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards import mathpool
from assay.rm_server.rewards.base import Item, ItemFailure, Outcome, Reward, Scored, until_deadline
from assay.rm_server.spec import ExactMatchSpec, JsonSchemaSpec, LengthPenaltySpec, MathEqualSpec, RegexSpec


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} {pattern!r} is not a valid regular expression: {exc}") from None


def _answer_pattern(pattern: str | None) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    compiled = _compile(pattern, "answer_pattern")
    if compiled.groups < 1:
        raise ValueError(f"answer_pattern {pattern!r} needs a capturing group: group 1 is the answer")
    return compiled


def extract_answer(pattern: re.Pattern[str], response: str) -> str | None:
    """Group 1 of the last match of `pattern` in `response`, None when there is none.

    The last match, because a response may restate intermediate results before its answer.
    """
    last = None
    for match in pattern.finditer(response):
        last = match
    return last.group(1) if last is not None else None


def _no_reference(kind: str) -> ItemFailure:
    return ItemFailure(ErrorType.invalid_input, f"{kind} needs a reference answer; the item has none")


def _unsupported(reward: Reward, granularity: Granularity, n: int) -> list[Outcome] | None:
    # The service refuses this up-front; a direct caller still gets a typed answer per item.
    if granularity in reward.granularities:
        return None
    what = f"{reward.type} does not score at granularity {Granularity(granularity).value!r}"
    return [ItemFailure(ErrorType.invalid_input, what)] * n


class _InlineRule(Reward):
    """A rule cheap enough to judge every item right on the event loop."""

    def __init__(self, name: str, reward_id: str, spec: Any) -> None:
        super().__init__(name, reward_id)
        self.spec = spec

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        refused = _unsupported(self, granularity, len(items))
        return refused if refused is not None else [self.judge(item, granularity) for item in items]

    @abstractmethod
    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        """The outcome of one item."""


class ExactMatch(_InlineRule):
    """1.0 when the answer (group 1 of `answer_pattern`'s last match, else the whole response)
    equals the reference, after stripping both when `strip`, ignoring case unless `case_sensitive`."""

    type = "rule.exact_match"
    needs_reference = True

    def __init__(self, name: str, reward_id: str, spec: ExactMatchSpec) -> None:
        super().__init__(name, reward_id, spec)
        self._pattern = _answer_pattern(spec.answer_pattern)

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        if item.reference is None:
            return _no_reference(self.type)
        answer = item.response if self._pattern is None else extract_answer(self._pattern, item.response)
        if answer is None:
            return Scored(0.0)
        reference = item.reference
        if self.spec.strip:
            answer, reference = answer.strip(), reference.strip()
        if not self.spec.case_sensitive:
            answer, reference = answer.casefold(), reference.casefold()
        return Scored(1.0 if answer == reference else 0.0)


class RegexMatch(_InlineRule):
    """1.0 when `pattern` is found in the response (`search`) or matches all of it (`fullmatch`).

    No flags: `^` and `$` anchor at the start and end of the whole response (`$` also just
    before a final newline), and `.` does not cross newlines. Inline flags such as `(?m)`,
    `(?s)` or `(?i)` in the pattern change that.
    """

    type = "rule.regex"

    def __init__(self, name: str, reward_id: str, spec: RegexSpec) -> None:
        super().__init__(name, reward_id, spec)
        pattern = _compile(spec.pattern, "pattern")
        self._match = pattern.fullmatch if spec.mode == "fullmatch" else pattern.search

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        return Scored(1.0 if self._match(item.response) is not None else 0.0)


def length_penalty(length: int, max_length: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong penalty: 0 up to max_length - buffer, then linear down to -penalty
    at max_length, -penalty beyond. length_penalty(95, 100, 10, 1.0) == -0.5."""
    start = max_length - buffer
    if length <= start:
        return 0.0
    if length > max_length:
        return -penalty
    return -penalty * (length - start) / buffer  # buffer > 0 here: start < length <= max_length


class LengthPenalty(_InlineRule):
    """A score <= 0 for overlong responses, counted in characters or whitespace-separated words."""

    type = "rule.length_penalty"

    def __init__(self, name: str, reward_id: str, spec: LengthPenaltySpec) -> None:
        if spec.buffer > spec.max_length:
            raise ValueError(f"buffer ({spec.buffer}) must not exceed max_length ({spec.max_length})")
        super().__init__(name, reward_id, spec)

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        text = item.response
        length = len(text) if self.spec.unit == "chars" else len(text.split())
        return Scored(length_penalty(length, self.spec.max_length, self.spec.buffer, self.spec.penalty))


class JsonSchema(_InlineRule):
    """1.0 when the whole response is JSON (no code fences) that validates against the schema.

    The schema's `$schema` picks the draft; without one, the latest draft jsonschema knows.
    """

    type = "rule.json_schema"

    def __init__(self, name: str, reward_id: str, spec: JsonSchemaSpec) -> None:
        super().__init__(name, reward_id, spec)
        cls = jsonschema.validators.validator_for(spec.json_schema)
        try:
            cls.check_schema(spec.json_schema)
        except jsonschema.exceptions.SchemaError as exc:
            where = "/".join(str(p) for p in exc.path) or "the top level"
            raise ValueError(f"schema is not a valid JSON Schema ({where}): {exc.message}") from None
        self._validator = cls(spec.json_schema)

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        try:
            document = json.loads(item.response)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's recursion limit
            return Scored(0.0)
        return Scored(1.0 if self._validator.is_valid(document) else 0.0)


class ArithSteps(_InlineRule):
    """Per-step correctness of an arithmetic-world solution (`arith.checks.step_labels`).

    Steps are 1.0 / 0.0 per segment of the response; the outcome is 1.0 only when there is at
    least one step and every step is right. The problem is read back from the prompt (a
    conversation: from its last user turn, where the question is).
    """

    type = "rule.arith_steps"
    granularities = frozenset({Granularity.outcome, Granularity.steps})

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        if isinstance(item.prompt, str):
            question = item.prompt
        else:
            question = next((m["content"] for m in reversed(item.prompt) if m["role"] == "user"), "")
        try:
            problem = parse_prompt(question)
        except ValueError:
            return ItemFailure(
                ErrorType.invalid_input,
                f"{self.type} needs an arithmetic prompt like 'Q: 23+45-17 A: ', got {question[:80]!r}",
            )
        steps = [1.0 if ok else 0.0 for ok in step_labels(problem, item.response)]
        value = 1.0 if steps and all(steps) else 0.0
        return Scored(value, steps=steps if granularity == Granularity.steps else None)


class MathEqual(Reward):
    """1.0 when the response's answer is mathematically equal to the reference (math-verify).

    With `answer_pattern`, the answer is group 1 of its last match (no match: 0.0); without,
    math-verify extracts it from the whole response (last `\\boxed{}`, `$...$`, or number). The
    reference is an answer, read as LaTeX math: "1/2", "0.5" and "\\frac{1}{2}" are equal.
    math-verify counts whole seconds, so `timeout_s` is rounded up.
    """

    type = "rule.math_equal"
    needs_reference = True

    def __init__(self, name: str, reward_id: str, spec: MathEqualSpec) -> None:
        super().__init__(name, reward_id)
        self.spec = spec
        self._pattern = _answer_pattern(spec.answer_pattern)
        self._seconds = max(1, math.ceil(spec.timeout_s))  # signal.alarm takes whole seconds

    async def start(self) -> None:
        await mathpool.start(id(self))

    async def close(self) -> None:
        await mathpool.release(id(self))

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        refused = _unsupported(self, granularity, len(items))
        if refused is not None:
            return refused
        out: dict[int, Outcome] = {}  # item index -> outcome; every index gets one below
        tasks: list[tuple[int, tuple[str, str, bool]]] = []  # (item index, (reference, answer, answer_is_bare))
        for i, item in enumerate(items):
            if item.reference is None:
                out[i] = _no_reference(self.type)
            elif self._pattern is None:
                tasks.append((i, (item.reference, item.response, False)))
            elif (answer := extract_answer(self._pattern, item.response)) is None:
                out[i] = Scored(0.0)
            else:
                tasks.append((i, (item.reference, answer, True)))
        # One pool task per item, so the deadline stops each item alone (see mathpool).
        results = await until_deadline([mathpool.judge(id(self), *task, self._seconds) for _, task in tasks])
        for (i, _), outcome in zip(tasks, results, strict=True):
            out[i] = outcome if isinstance(outcome, (Scored, ItemFailure)) else _crashed(outcome)
        return [out[i] for i in range(len(items))]


def _crashed(exc: BaseException) -> ItemFailure:
    return ItemFailure(ErrorType.internal, f"math-verify failed: {exc!r}")


RULES: dict[str, Callable[[str, str, Any], Reward]] = {  # rule type -> its class: (name, reward_id, spec)
    cls.type: cls for cls in (MathEqual, ExactMatch, RegexMatch, LengthPenalty, JsonSchema, ArithSteps)
}
