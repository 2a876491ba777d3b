"""The generative verifier's prompt: the world's LLM-as-judge format.

The verifier is the policy architecture fine-tuned to continue this prompt with `yes` or `no`.
The solution sits where the policy writes its own answers, between the `A: ` that opens it and
the line `Correct? ` that closes it, so the verifier reads it with the features it learned while
solving. A judge must keep the solution on one line (strip newlines and special tokens) so that
it cannot forge the closing marker. The first generated token decides:
P(yes) = p("y") / (p("y") + p("n")).
"""

from __future__ import annotations

VERIFIER_TEMPLATE = "Q: {problem} A: {solution}\nCorrect? "
YES, NO = "yes", "no"


def verifier_prompt(problem: str, solution: str) -> str:
    """`problem` is the bare expression (`23+45-17`), `solution` the response under judgement."""
    return VERIFIER_TEMPLATE.format(problem=problem, solution=solution)
