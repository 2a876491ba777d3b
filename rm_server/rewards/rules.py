"""Rule rewards: deterministic checks of a response, one class per `rule.*` spec type.

A rule answers 1.0 (pass) or 0.0 (fail), and a failed check is a real answer, not an error. A
rule returns an `ItemFailure` only when it cannot judge: a missing reference, a prompt that is
not an arithmetic problem, math-verify running out of time.

All rules but math_equal are cheap and judge inline on the event loop. math_equal runs
math-verify (sympy) in a small pool of worker *processes* shared by every math_equal reward of
the process: math-verify enforces its timeouts with `signal.alarm`, which works only in a
process's main thread, while the service scores from an event loop in any thread. A pool task
runs in its worker's main thread, so math-verify's own timeouts work there.
"""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import re
import threading
from abc import abstractmethod
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import product
from typing import Any

import jsonschema

from arith.checks import step_labels
from arith.world import parse_prompt
from rm_server.protocol import ErrorType, Granularity
from rm_server.rewards.base import Item, ItemFailure, Outcome, Reward, Scored
from rm_server.spec import ExactMatchSpec, JsonSchemaSpec, LengthPenaltySpec, MathEqualSpec, RegexSpec


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
    for last in pattern.finditer(response):
        pass
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
    least one step and every step is right. The problem is read back from the prompt.
    """

    type = "rule.arith_steps"
    granularities = frozenset({Granularity.outcome, Granularity.steps})

    def judge(self, item: Item, granularity: Granularity) -> Outcome:
        try:
            problem = parse_prompt(item.prompt)
        except ValueError:
            return ItemFailure(
                ErrorType.invalid_input,
                f"{self.type} needs an arithmetic prompt like 'Q: 23+45-17 A: ', got {item.prompt[:80]!r}",
            )
        steps = [1.0 if ok else 0.0 for ok in step_labels(problem, item.response)]
        value = 1.0 if steps and all(steps) else 0.0
        return Scored(value, steps=steps if granularity == Granularity.steps else None)


# --- math_equal: math-verify in a shared process pool ----------------------------------------

POOL_WORKERS = 2  # sympy is CPU-bound, and the service's other rewards need cores too
CHUNK_ITEMS = 8  # items per pool task: few round trips, yet little lost when one task hangs

_pool: ProcessPoolExecutor | None = None
_pool_users: set[int] = set()  # ids of the math_equal rewards using the pool; empty -> shut it
_pool_lock = threading.Lock()  # rewards may be scored from event loops in several threads


def _warm_worker() -> None:
    # Importing sympy and building the LaTeX parser take a second or two: pay it up front.
    from math_verify import parse

    parse("$\\frac{1}{2}$")


def _acquire_pool(user: int) -> ProcessPoolExecutor:
    global _pool
    with _pool_lock:
        _pool_users.add(user)
        if _pool is None:
            # spawn, not fork: forking a process that runs threads can copy their held locks.
            # A spawned worker re-runs the parent's main *script* (not a `-m` module), so entry
            # points should not import torch at module level, or every worker loads it too.
            ctx = multiprocessing.get_context("spawn")
            _pool = ProcessPoolExecutor(POOL_WORKERS, mp_context=ctx, initializer=_warm_worker)
        return _pool


def _drop_pool(pool: ProcessPoolExecutor, kill: bool) -> None:
    """Forget `pool`, so the next task starts a fresh one; with `kill`, end its workers now."""
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    if kill:
        # A worker stuck in C code (a huge sympy power) never sees its alarm, and a running task
        # cannot be cancelled; killing the process is the only way back. ProcessPoolExecutor
        # has no public way to do it before Python 3.14. Tasks of other calls on this pool fail
        # with BrokenProcessPool and are retried on the fresh pool.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    pool.shutdown(wait=False, cancel_futures=True)


def _parse(text: str, seconds: int, bare: bool) -> list:
    """math-verify's parse. A bare answer (a reference, an answer_pattern group) is read as LaTeX
    math first: the default extraction looks for numbers in prose and reads `2^{10}` as 2."""
    from math_verify import parse

    for attempt in ([f"${text}$", text] if bare and "$" not in text else [text]):
        try:
            found = parse(attempt, parsing_timeout=seconds, raise_on_error=True)
        except Exception:  # unparseable; math-verify's TimeoutException is a BaseException
            found = []
        if found:
            return found
    return []


def _equal(gold: list, target: list, seconds: int) -> bool:
    from math_verify import verify

    # Pair by pair, as verify does over lists, but so that one pair sympy cannot compare is not
    # a verdict, while a timeout (raise_on_error) still reaches the caller.
    for g, t in product(gold, target):
        try:
            if verify(g, t, timeout_seconds=seconds, raise_on_error=True):
                return True
        except Exception:
            continue
    return False


def _verify_chunk(tasks: list[tuple[str, str, bool]], seconds: int) -> list[tuple[str, Any]]:
    """Pool task: judge (reference, answer, answer_is_bare) triples in a worker's main thread.

    Returns ("ok", 1.0 | 0.0), ("timeout", why) or ("invalid", why) per triple: plain tuples,
    since an ItemFailure does not survive pickling.
    """
    from math_verify.errors import TimeoutException

    golds: dict[str, list] = {}  # the items of one prompt group share their reference
    out: list[tuple[str, Any]] = []
    for reference, answer, bare in tasks:
        try:
            if reference not in golds:
                golds[reference] = _parse(reference, seconds, bare=True)
            if not golds[reference]:
                out.append(("invalid", f"math-verify finds no answer in the reference {reference[:80]!r}"))
                continue
            target = _parse(answer, seconds, bare)
            out.append(("ok", 1.0 if _equal(golds[reference], target, seconds) else 0.0))
        except TimeoutException:
            out.append(("timeout", f"math-verify did not finish within {seconds} s"))
    return out


def _outcome(status: str, payload: Any) -> Outcome:
    if status == "ok":
        return Scored(payload)
    return ItemFailure(ErrorType.timeout if status == "timeout" else ErrorType.invalid_input, payload)


def _hang_budget(n: int, seconds: int) -> float:
    """How long a pool task of n items may run before its worker counts as stuck.

    A well-behaved item takes a few `seconds` at worst (two parses and a comparison or so, each
    capped by math-verify's alarm). Doubled, since the executor marks one task more running than
    it has workers, so a "running" task may still wait for another; plus a worker's start-up.
    """
    return 6 * seconds * n + 10


class _Hung(Exception):
    pass


async def _result(fut: Future, budget: float) -> Any:
    """The pool task's result without blocking the loop; _Hung when it runs past `budget`.

    Time spent queued behind other tasks does not count: that is load, not a hang.
    """
    waiter = asyncio.wrap_future(fut)
    try:
        while not fut.running() and not fut.done():
            await asyncio.wait([waiter], timeout=0.05)
        done, _ = await asyncio.wait([waiter], timeout=budget)
    except asyncio.CancelledError:
        waiter.cancel()  # a task still queued is dropped rather than run for nobody
        raise
    if not done:
        waiter.cancel()  # nobody will read the BrokenProcessPool it ends with
        raise _Hung
    return waiter.result()


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
        pool = _acquire_pool(id(self))
        # Start every worker and import math-verify now rather than on the first request.
        await asyncio.gather(*(asyncio.wrap_future(pool.submit(_warm_worker)) for _ in range(POOL_WORKERS)))

    async def close(self) -> None:
        global _pool
        with _pool_lock:
            _pool_users.discard(id(self))
            pool = None
            if not _pool_users:  # the last math_equal reward out shuts the pool
                pool, _pool = _pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True)

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        refused = _unsupported(self, granularity, len(items))
        if refused is not None:
            return refused
        out: list[Outcome | None] = [None] * len(items)
        tasks: list[tuple[int, tuple[str, str, bool]]] = []  # (item index, pool task triple)
        for i, item in enumerate(items):
            if item.reference is None:
                out[i] = _no_reference(self.type)
            elif self._pattern is None:
                tasks.append((i, (item.reference, item.response, False)))
            elif (answer := extract_answer(self._pattern, item.response)) is None:
                out[i] = Scored(0.0)
            else:
                tasks.append((i, (item.reference, answer, True)))
        size = max(1, min(CHUNK_ITEMS, math.ceil(len(tasks) / POOL_WORKERS)))
        chunks = [tasks[k : k + size] for k in range(0, len(tasks), size)]
        results = await asyncio.gather(*(self._run([t for _, t in chunk]) for chunk in chunks))
        for chunk, outcomes in zip(chunks, results, strict=True):
            for (i, _), outcome in zip(chunk, outcomes, strict=True):
                out[i] = outcome
        return out  # type: ignore[return-value]  (every slot is filled above)

    async def _run(self, triples: list[tuple[str, str, bool]]) -> list[Outcome]:
        n, budget = len(triples), _hang_budget(len(triples), self._seconds)
        for _ in range(2):  # a pool broken by another call's stuck task gets one retry
            pool = _acquire_pool(id(self))
            try:
                fut = pool.submit(_verify_chunk, triples, self._seconds)
            except RuntimeError:  # shut down or broken under us (BrokenProcessPool is one too)
                _drop_pool(pool, kill=False)
                continue
            try:
                raw = await _result(fut, budget)
            except BrokenProcessPool:
                _drop_pool(pool, kill=False)
                continue
            except _Hung:
                _drop_pool(pool, kill=True)
                why = f"math-verify ran past {budget:.0f} s on a batch of {n}; its worker was restarted"
                return [ItemFailure(ErrorType.timeout, why)] * n
            return [_outcome(status, payload) for status, payload in raw]
        return [ItemFailure(ErrorType.internal, "math-verify's worker process died twice")] * n


RULES: dict[str, type[Reward]] = {
    cls.type: cls for cls in (MathEqual, ExactMatch, RegexMatch, LengthPenalty, JsonSchema, ArithSteps)
}
