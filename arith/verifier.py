"""The generative verifier's prompt: the world's LLM-as-judge format.

The verifier is the policy architecture fine-tuned to continue this prompt with `yes` or `no`.
The solution under judgement sits between explicit delimiters so that it reads as data.
Its first generated token decides: P(yes) = p("y") / (p("y") + p("n")).
"""

from __future__ import annotations

VERIFIER_TEMPLATE = "Problem: {problem}\n<solution>{solution}</solution>\nCorrect? "
YES, NO = "yes", "no"


def verifier_prompt(problem: str, solution: str) -> str:
    """`problem` is the bare expression (`23+45-17`), `solution` the response under judgement."""
    return VERIFIER_TEMPLATE.format(problem=problem, solution=solution)
