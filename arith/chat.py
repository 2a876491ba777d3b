"""The arithmetic world as chat: problems asked in conversation, worked answers as assistant turns.

The same problems, splits and rule checkers as `world`, dressed the way real data is: the user
asks in one of several phrasings, some conversations open with a system message, and the
assistant answers with the world's worked solution, so the answer still ends in `#### n` and
`checks` labels it:

    [{"role": "system", "content": "You are a careful calculator. ..."},
     {"role": "user", "content": "What is 23+45-17?"}]
    -> {"role": "assistant", "content": "23+45=68 68-17=51 #### 51"}

Wrong answers for preference data come in three kinds, each a subset a reward model can be
judged on separately: `slip` (one step's result is off and the rest follows it consistently:
well formed, only arithmetic shows it), `answer` (right work, a final answer that disagrees with
it) and `unfinished` (cut off before the answer). Every choice here is drawn from a
`random.Random` the caller seeds, so files built from a seed are the same bytes every time.
"""

from __future__ import annotations

import random

from assay.arith.world import ANSWER_MARK, Problem, apply

Message = dict[str, str]  # {"role": ..., "content": ...}, as chat templates and TRL take them

SYSTEM_PROMPTS = (
    "You are a careful calculator. Show each step, then give the answer after ####.",
    "You are a helpful assistant.",
    "Solve arithmetic problems step by step, and write the final answer at the end.",
    "You are a patient math tutor who explains every calculation.",
)
QUESTIONS = (
    "What is {}?",
    "Compute {}.",
    "Work out {} step by step.",
    "{} = ?",
    "Please evaluate {}, showing your work.",
    "Could you calculate {} for me?",
    "I need the value of {}. Can you help?",
    "Find the result of the following expression: {}",
    "Quick question: what does {} equal?",
    "Calculate {} and explain each step.",
)
SYSTEM_SHARE = 0.35  # of conversations that open with a system message
REJECTION_KINDS = ("slip", "answer", "unfinished")
_DELTAS = (-10, -2, -1, 1, 2, 10)  # how far a slip or a wrong answer lands from the truth


def prompt_messages(problem: Problem, rng: random.Random) -> list[Message]:
    """The conversation that asks `problem`: an optional system message, then the user's question."""
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_SHARE else None
    question = rng.choice(QUESTIONS).format(problem.expression)
    head = [{"role": "system", "content": system}] if system is not None else []
    return [*head, {"role": "user", "content": question}]


def answer_message(text: str) -> Message:
    return {"role": "assistant", "content": text}


def wrong_solution(problem: Problem, kind: str, rng: random.Random) -> str:
    """A wrong worked answer to `problem` of one of REJECTION_KINDS."""
    if kind == "slip":
        # One step's result is off by a small delta; later steps compute correctly from the wrong
        # running value, so every equation after the slip checks out locally.
        at, delta = rng.randrange(len(problem.ops)), rng.choice(_DELTAS)
        steps, acc = [], problem.operands[0]
        for i, (op, x) in enumerate(zip(problem.ops, problem.operands[1:])):
            nxt = apply(op, acc, x) + (delta if i == at else 0)
            steps.append(f"{acc}{op}{x}={nxt}")
            acc = nxt
        return " ".join(steps) + f" {ANSWER_MARK} {acc}"
    if kind == "answer":
        return " ".join(problem.steps()) + f" {ANSWER_MARK} {problem.answer + rng.choice(_DELTAS)}"
    if kind == "unfinished":
        work = " ".join(problem.steps())
        return work[: rng.randrange(1, len(work))].rstrip()
    raise ValueError(f"kind must be one of {REJECTION_KINDS}, not {kind!r}")
