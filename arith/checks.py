"""Rule checkers: final-answer correctness and per-step correctness.

These give the world its outcome and process labels for free. A response is split into
segments: one per shown equation, then the final answer (`#### 51`). A segment is correct when,
re-computed against the problem, it is exactly the step the correct solution takes there: right
left operand (the true running value), right operator and right-hand operand (copied from the
question), and right result. So after the first error every later segment is wrong too, which
is what a process reward should say about a partial solution that has left the track.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from assay.arith.world import ANSWER_MARK, Problem, apply

_EQUATION = re.compile(r"^(-?\d+)([+-])(\d+)=(-?\d+)$")
_FINAL = re.compile(rf"{re.escape(ANSWER_MARK)}\s*(-?\d+)\s*$")
_FINAL_SEGMENT = re.compile(rf"^{re.escape(ANSWER_MARK)}\s+-?\d+$")


@dataclass(frozen=True)
class Segment:
    """One step of a response: its text and [start, end) character span in the response."""

    text: str
    start: int
    end: int
    is_final: bool


def final_answer(response: str) -> int | None:
    """The integer after `####` at the end of the response, or None if there is none."""
    m = _FINAL.search(response.strip())
    return int(m.group(1)) if m else None


def is_correct(problem: Problem, response: str) -> bool:
    """Outcome label: the final answer is present and equals the problem's answer."""
    return final_answer(response) == problem.answer


def segments(response: str) -> list[Segment]:
    """Split a response into its step segments, the final answer last.

    `23+45=68 68-17=51 #### 51` -> [`23+45=68`, `68-17=51`, `#### 51`]. Text after the answer
    mark is one segment, whatever it holds.
    """
    mark = response.find(ANSWER_MARK)
    work_end = mark if mark >= 0 else len(response)
    out = [Segment(m.group(0), m.start(), m.end(), False) for m in re.finditer(r"\S+", response[:work_end])]
    if mark >= 0:
        tail = response[mark:].rstrip()
        out.append(Segment(tail, mark, mark + len(tail), True))
    return out


def is_well_formed(response: str) -> bool:
    """Every segment parses: equations `a+b=c` / `a-b=c`, then `#### n` last.

    A wrong but well-formed response has only plausible slips (a wrong digit, a miscopied
    operand); a malformed one shows a broken token somewhere, which is far easier to catch.
    """
    segs = segments(response)
    return (
        bool(segs)
        and _FINAL_SEGMENT.match(segs[-1].text) is not None
        and all(_EQUATION.match(s.text) for s in segs[:-1])
    )


def step_labels(problem: Problem, response: str) -> list[bool]:
    """Per-segment correctness, one bool per `segments(response)` entry.

    A response showing a wrong number of steps has its surplus equations marked wrong, and its
    final answer marked wrong unless every step was right.
    """
    truth = problem.running_values()
    labels: list[bool] = []
    on_track = True
    step = 0
    for seg in segments(response):
        if seg.is_final:
            ok = on_track and step == len(truth) and final_answer(seg.text) == problem.answer
        else:
            ok = on_track and step < len(truth) and _equation_ok(problem, step, seg.text)
            step += 1
        on_track = on_track and ok
        labels.append(ok)
    return labels


def _equation_ok(problem: Problem, step: int, text: str) -> bool:
    m = _EQUATION.match(text)
    if not m:
        return False
    left, op, right, result = int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4))
    expected_left = problem.operands[0] if step == 0 else problem.running_values()[step - 1]
    return (
        left == expected_left
        and op == problem.ops[step]
        and right == problem.operands[step + 1]
        and result == apply(op, left, right)
    )
