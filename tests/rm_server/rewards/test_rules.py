"""Rule rewards: each rule's verdicts, and math_equal's process pool (timeouts, deadlines, threads)."""

import asyncio
import hashlib
import os
import threading

import pytest

from assay.arith.world import Problem
from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards import mathpool
from assay.rm_server.rewards.base import DEADLINE, Item, ItemFailure, Scored
from assay.rm_server.rewards.rules import (
    RULES,
    ArithSteps,
    ExactMatch,
    JsonSchema,
    LengthPenalty,
    MathEqual,
    RegexMatch,
    length_penalty,
)
from assay.rm_server.spec import (
    ArithStepsSpec,
    ExactMatchSpec,
    JsonSchemaSpec,
    LengthPenaltySpec,
    MathEqualSpec,
    RegexSpec,
)
from tests.helpers import wait_for

pytestmark = pytest.mark.unit

HASH_ANSWER = r"####\s*(-?\d+)\s*$"  # the embedded spec's answer_pattern


def score(reward, items, granularity=Granularity.outcome):
    return asyncio.run(reward.score(items, granularity))


def values(outcomes):
    assert all(isinstance(o, Scored) for o in outcomes), outcomes
    return [o.value for o in outcomes]


@pytest.fixture(scope="module")
def math_equal():
    """One math_equal reward for the module, so the pool's workers start once."""
    reward = MathEqual("correct", "sha256:x", MathEqualSpec(type="rule.math_equal"))
    asyncio.run(reward.start())
    yield reward
    asyncio.run(reward.close())


def test_rules_table_maps_every_type_to_its_class():
    assert set(RULES) == {
        "rule.math_equal",
        "rule.exact_match",
        "rule.regex",
        "rule.length_penalty",
        "rule.json_schema",
        "rule.arith_steps",
    }
    assert all(cls.type == t for t, cls in RULES.items())
    assert MathEqual.needs_reference and ExactMatch.needs_reference and not RegexMatch.needs_reference
    assert ArithSteps.granularities == {Granularity.outcome, Granularity.steps}
    assert JsonSchema.granularities == {Granularity.outcome}


# --- math_equal ------------------------------------------------------------------------------


def test_math_equal_equivalent_forms(math_equal):
    pairs = [
        ("0.5", "1/2"),
        ("1/2", "\\frac{1}{2}"),
        ("The answer is $\\frac{1}{2}$.", "0.5"),
        ("$\\boxed{2}$", "2"),
        ("so we get \\boxed{1024}", "2^{10}"),  # a bare reference is read as LaTeX, not as "2"
        ("3", "2"),
        ("$\\boxed{\\frac{1}{3}}$", "0.5"),
    ]
    out = score(math_equal, [Item("p", response, ref) for response, ref in pairs])
    assert values(out) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_math_equal_many_items_keep_their_order(math_equal):
    items = [Item("p", str(k), str(k if k % 3 else k + 1)) for k in range(40)]  # several pool tasks
    assert values(score(math_equal, items)) == [0.0 if k % 3 == 0 else 1.0 for k in range(40)]


def test_math_equal_answer_pattern():
    reward = MathEqual("c", "id", MathEqualSpec(type="rule.math_equal", answer_pattern=HASH_ANSWER))
    try:
        out = score(
            reward,
            [
                Item("Q: 23+45-17 A: ", "23+45=68 68-17=51 #### 51", "51"),
                Item("Q: 23+45-17 A: ", "23+45=68 68-17=50 #### 50", "51"),
                Item("Q: 23+45-17 A: ", "23+45=68 68-17=51", "51"),  # no answer mark: 0, not an error
                Item("Q: 23+45-17 A: ", "the sum is 51 #### 51 then", "51"),  # pattern is anchored at the end
            ],
        )
    finally:
        asyncio.run(reward.close())
    assert values(out) == [1.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("answer", "right", "wrong", "none"),
    [
        ({"how": "boxed"}, "so \\boxed{\\frac{1}{2}} or \\boxed{0.50}", "\\boxed{0.5} no: \\boxed{2}", "0.5"),
        ({"how": "last_number"}, "1/4 + 1/4 is 0.50.", "0.5 is wrong, 2 is right", "half"),
        ({"how": "hashes"}, "so: #### 0.50", "#### 0.5 then #### 2", "0.5 ####"),
        ({"how": "regex", "pattern": r"Answer: (\S+)"}, "Answer: 1/2", "Answer: 1/2, Answer: 2", "answer: 0.5"),
    ],
)
def test_math_equal_finds_the_answer_as_told(answer, right, wrong, none):
    """The last answer counts; none found is 0, not an error; the answer then goes to math-verify."""
    reward = MathEqual("c", "id", MathEqualSpec.model_validate({"type": "rule.math_equal", "answer": answer}))
    try:
        out = score(reward, [Item("p", right, "0.5"), Item("p", wrong, "0.5"), Item("p", none, "0.5")])
    finally:
        asyncio.run(reward.close())
    assert values(out) == [1.0, 0.0, 0.0]


def test_math_equal_compares_numbers_as_people_write_them():
    reward = MathEqual("c", "id", MathEqualSpec.model_validate({"type": "rule.math_equal", "answer": {"how": "boxed"}}))
    pairs = [("\\boxed{1,234}", "1234"), ("\\boxed{2.50}", "2.5"), ("\\boxed{-3}", "-3"), ("\\boxed{+07}", "7")]
    try:
        out = score(reward, [Item("p", response, ref) for response, ref in pairs])
    finally:
        asyncio.run(reward.close())
    assert values(out) == [1.0, 1.0, 1.0, 1.0]


def test_math_equal_without_reference_fails_that_item_only(math_equal):
    out = score(math_equal, [Item("p", "2", None), Item("p", "2", "2")])
    assert isinstance(out[0], ItemFailure) and out[0].type == ErrorType.invalid_input
    assert out[1] == Scored(1.0)


def test_math_equal_from_a_worker_thread(math_equal):
    # The pitfall: math-verify's signal.alarm fails outside a main thread. Score from an event
    # loop running in another thread, as the service does.
    result = {}

    def run():
        items = [Item("p", "$\\frac{2}{4}$", "0.5")]
        result["out"] = asyncio.run(math_equal.score(items, Granularity.outcome))

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=120)
    assert values(result["out"]) == [1.0]


def test_math_equal_timeout_is_a_typed_failure():
    # sympy needs far longer than 1 s to compare 9^(9^9) with 1; math-verify's alarm stops it.
    reward = MathEqual("c", "id", MathEqualSpec(type="rule.math_equal", timeout_s=0.5))
    try:
        out = score(reward, [Item("p", "$9^{9^{9}}$", "1"), Item("p", "$1$", "1")])
    finally:
        asyncio.run(reward.close())
    assert isinstance(out[0], ItemFailure) and out[0].type == ErrorType.timeout
    assert out[1] == Scored(1.0)


# Stuck in C code: no signal handler runs until it returns, so math-verify's alarm cannot stop it
# (about a minute on one core), as with sympy deep in a huge computation.
STUCK = (hashlib.pbkdf2_hmac, ("sha256", b"x", b"y", 10**9))


@pytest.mark.slow  # worker processes killed and replaced: seconds each
def test_a_task_stuck_in_c_code_is_stopped_at_its_limit_and_its_worker_replaced(math_equal):
    before = set(mathpool.worker_pids())
    with pytest.raises(mathpool.Stopped):
        asyncio.run(mathpool.call(id(math_equal), *STUCK, limit_s=0.5))
    wait_for(lambda: len(mathpool.worker_pids()) == mathpool.POOL_WORKERS, 60)
    assert len(before - set(mathpool.worker_pids())) == 1  # the stuck worker was killed, not waited for
    assert values(score(math_equal, [Item("p", "7", "7")])) == [1.0]


@pytest.mark.slow  # worker processes killed and replaced: seconds each
def test_a_cancelled_caller_stops_its_running_task(math_equal):
    async def cancel_while_running():
        task = asyncio.ensure_future(mathpool.call(id(math_equal), *STUCK, limit_s=600))
        while not any(f.running() for f in mathpool._running):
            await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    before = set(mathpool.worker_pids())
    asyncio.run(cancel_while_running())
    wait_for(lambda: len(before - set(mathpool.worker_pids())) == 1, 60)
    assert values(score(math_equal, [Item("p", "7", "7")])) == [1.0]


def test_an_item_whose_deadline_passed_never_starts(math_equal, tmp_path):
    async def past_deadline():
        token = DEADLINE.set(asyncio.get_running_loop().time() - 1)
        try:
            return await mathpool.call(id(math_equal), os.mkdir, (str(tmp_path / "ran"),), limit_s=60)
        finally:
            DEADLINE.reset(token)

    with pytest.raises(ItemFailure) as failure:
        asyncio.run(past_deadline())
    assert failure.value.type == ErrorType.timeout
    assert not (tmp_path / "ran").exists()


def test_hostile_items_fail_typed_at_the_request_deadline():
    # Each 9^(9^9) runs into math-verify's 5 s limit once or more; the request allows 1 s in all.
    reward = MathEqual("c", "id", MathEqualSpec(type="rule.math_equal", timeout_s=5))

    async def within_one_second():
        await reward.start()
        token = DEADLINE.set(asyncio.get_running_loop().time() + 1)
        try:
            return await reward.score([Item("p", "$9^{9^{9}}$", "1")] * 6, Granularity.outcome)
        finally:
            DEADLINE.reset(token)
            await reward.close()

    out = asyncio.run(within_one_second())
    assert [o.type for o in out] == [ErrorType.timeout] * 6, out


@pytest.mark.slow  # worker processes killed and replaced: seconds each
def test_closing_the_pool_kills_work_stuck_in_c_code(monkeypatch):
    monkeypatch.setattr(mathpool, "_pool", None)  # apart from the module fixture's pool and user
    monkeypatch.setattr(mathpool, "_pool_users", set())

    async def close_while_running():
        await mathpool.start(1)
        workers = mathpool.worker_pids()
        task = asyncio.ensure_future(mathpool.call(1, *STUCK, limit_s=600))
        while not any(f.running() for f in mathpool._running):
            await asyncio.sleep(0.05)
        await mathpool.release(1)
        with pytest.raises(mathpool.PoolClosed):
            await task
        return workers

    workers = asyncio.run(close_while_running())
    assert not any(_alive(p) for p in workers)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_math_equal_close_is_idempotent_and_last_user_shuts_the_pool(monkeypatch):
    monkeypatch.setattr(mathpool, "_pool", None)  # apart from the module fixture's pool and user
    monkeypatch.setattr(mathpool, "_pool_users", set())
    a = MathEqual("a", "id", MathEqualSpec(type="rule.math_equal"))
    b = MathEqual("b", "id", MathEqualSpec(type="rule.math_equal"))
    asyncio.run(a.start())
    asyncio.run(b.start())
    asyncio.run(a.close())
    asyncio.run(a.close())
    assert mathpool._pool is not None
    assert values(score(b, [Item("p", "4", "4")])) == [1.0]  # b still has the pool
    asyncio.run(b.close())
    asyncio.run(b.close())
    assert mathpool._pool is None


def test_math_equal_bad_answer_pattern_is_refused():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        MathEqual("c", "id", MathEqualSpec(type="rule.math_equal", answer_pattern="(unclosed"))
    with pytest.raises(ValueError, match="capturing group"):
        MathEqual("c", "id", MathEqualSpec(type="rule.math_equal", answer_pattern=r"####\s*\d+"))
    with pytest.raises(ValueError, match="capturing group"):
        MathEqualSpec.model_validate({"type": "rule.math_equal", "answer": {"how": "regex", "pattern": "x"}})


# --- exact_match, regex ----------------------------------------------------------------------


def test_exact_match():
    plain = ExactMatch("e", "id", ExactMatchSpec(type="rule.exact_match"))
    assert values(
        score(
            plain,
            [
                Item("p", " Paris\n", "Paris"),
                Item("p", "paris", "Paris"),
                Item("p", "Paris.", "Paris"),
            ],
        )
    ) == [1.0, 0.0, 0.0]

    loose = ExactMatch("e", "id", ExactMatchSpec(type="rule.exact_match", case_sensitive=False, strip=False))
    assert values(score(loose, [Item("p", "PARIS", "paris"), Item("p", " paris", "paris")])) == [1.0, 0.0]

    extract = ExactMatch("e", "id", ExactMatchSpec(type="rule.exact_match", answer_pattern=r"answer: (\w+)"))
    assert values(
        score(
            extract,
            [
                Item("p", "answer: Rome, no, answer: Paris", "Paris"),  # the last match counts
                Item("p", "answer: Rome", "Paris"),
                Item("p", "Paris", "Paris"),  # no match
            ],
        )
    ) == [1.0, 0.0, 0.0]

    out = score(plain, [Item("p", "Paris", None)])
    assert isinstance(out[0], ItemFailure) and out[0].type == ErrorType.invalid_input


def test_regex_search_and_fullmatch():
    pattern = r"#### -?\d+"
    search = RegexMatch("r", "id", RegexSpec(type="rule.regex", pattern=pattern))
    full = RegexMatch("r", "id", RegexSpec(type="rule.regex", pattern=pattern, mode="fullmatch"))
    items = [Item("p", "#### 51"), Item("p", "68-17=51 #### 51"), Item("p", "51")]
    assert values(score(search, items)) == [1.0, 1.0, 0.0]
    assert values(score(full, items)) == [1.0, 0.0, 0.0]


def test_regex_anchors_are_whole_response():
    reward = RegexMatch("r", "id", RegexSpec(type="rule.regex", pattern=r"^b$"))
    assert values(score(reward, [Item("p", "a\nb"), Item("p", "b\n")])) == [0.0, 1.0]


def test_regex_invalid_pattern_is_refused():
    with pytest.raises(ValueError, match=r"pattern '\(a' is not a valid regular expression"):
        RegexMatch("r", "id", RegexSpec(type="rule.regex", pattern="(a"))


def test_inline_rule_refuses_an_unsupported_granularity():
    reward = RegexMatch("r", "id", RegexSpec(type="rule.regex", pattern="a"))
    out = score(reward, [Item("p", "a")], Granularity.steps)
    assert isinstance(out[0], ItemFailure) and out[0].type == ErrorType.invalid_input


# --- length_penalty --------------------------------------------------------------------------


def test_length_penalty_function():
    # 0 up to 90, linear to -2 at 100, -2 beyond.
    assert [length_penalty(n, 100, 10, 2.0) for n in (0, 90, 91, 95, 100, 101)] == [
        0.0,
        0.0,
        pytest.approx(-0.2),
        pytest.approx(-1.0),
        -2.0,
        -2.0,
    ]
    assert [length_penalty(n, 10, 0, 1.0) for n in (10, 11)] == [0.0, -1.0]


def test_length_penalty_chars_and_words():
    chars = LengthPenalty("l", "id", LengthPenaltySpec(type="rule.length_penalty", max_length=8, buffer=4))
    assert values(score(chars, [Item("p", "x" * n) for n in (4, 6, 8, 9)])) == [0.0, -0.5, -1.0, -1.0]

    words = LengthPenalty(
        "l", "id", LengthPenaltySpec(type="rule.length_penalty", max_length=3, unit="words", penalty=0.5)
    )
    assert values(score(words, [Item("p", "a  b\nc"), Item("p", "a b c d")])) == [0.0, -0.5]


def test_length_penalty_buffer_longer_than_max_is_refused():
    with pytest.raises(ValueError, match="buffer"):
        LengthPenalty("l", "id", LengthPenaltySpec(type="rule.length_penalty", max_length=5, buffer=6))


# --- json_schema -----------------------------------------------------------------------------


def test_json_schema():
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
    }
    reward = JsonSchema("j", "id", JsonSchemaSpec(type="rule.json_schema", schema=schema))
    assert values(
        score(
            reward,
            [
                Item("p", ' {"answer": 51}\n'),
                Item("p", '{"answer": "51"}'),  # wrong type
                Item("p", '{"result": 51}'),  # missing key
                Item("p", '```json\n{"answer": 51}\n```'),  # not JSON as a whole
                Item("p", "[" * 100_000),  # deeper than the parser's recursion limit
            ],
        )
    ) == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_json_schema_bad_schema_is_refused():
    with pytest.raises(ValueError, match="not a valid JSON Schema"):
        JsonSchema("j", "id", JsonSchemaSpec(type="rule.json_schema", schema={"type": "integr"}))


# --- arith_steps -----------------------------------------------------------------------------

PROBLEM = Problem((23, 45, 17), ("+", "-"))


def test_arith_steps_correct_solution():
    reward = ArithSteps("s", "id", ArithStepsSpec(type="rule.arith_steps"))
    item = Item(PROBLEM.prompt, PROBLEM.solution)
    assert score(reward, [item], Granularity.steps) == [Scored(1.0, steps=[1.0, 1.0, 1.0])]
    assert score(reward, [item]) == [Scored(1.0)]  # outcome: no steps attached


def test_arith_steps_wrong_middle_step_spoils_the_rest():
    reward = ArithSteps("s", "id", ArithStepsSpec(type="rule.arith_steps"))
    wrong = Item(PROBLEM.prompt, "23+45=69 69-17=52 #### 52")
    empty = Item(PROBLEM.prompt, "")
    assert score(reward, [wrong, empty], Granularity.steps) == [
        Scored(0.0, steps=[0.0, 0.0, 0.0]),
        Scored(0.0, steps=[]),
    ]
    slip = Item(PROBLEM.prompt, "23+45=68 68-17=50 #### 51")  # last step wrong, answer right
    assert score(reward, [slip], Granularity.steps) == [Scored(0.0, steps=[1.0, 0.0, 0.0])]


def test_arith_steps_non_arithmetic_prompt():
    reward = ArithSteps("s", "id", ArithStepsSpec(type="rule.arith_steps"))
    poem = Item("Write a poem about the sea.", "23+45=68 #### 68")
    out = score(reward, [poem, Item(PROBLEM.prompt, PROBLEM.solution)])
    assert isinstance(out[0], ItemFailure) and out[0].type == ErrorType.invalid_input
    assert out[1] == Scored(1.0)


@pytest.mark.slow  # worker processes killed and replaced: seconds each
def test_math_workers_exit_when_the_service_process_is_killed(tmp_path):
    # A server killed with SIGKILL cannot shut its pool down; the workers must notice and exit.
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio, os, sys\n"
        "from assay.rm_server.rewards import mathpool\n"
        "async def main():\n"
        "    await mathpool.start(1)\n"
        "    print(' '.join(str(p) for p in mathpool.worker_pids()), flush=True)\n"
        "    await asyncio.sleep(60)\n"
        "if __name__ == '__main__':\n"
        "    asyncio.run(main())\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    workers = [int(p) for p in proc.stdout.readline().split()]
    assert len(workers) == mathpool.POOL_WORKERS
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    deadline = time.monotonic() + 10
    while any(alive(p) for p in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers)
