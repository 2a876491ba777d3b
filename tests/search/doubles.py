"""Test doubles for the search strategies: scripted generators and a table-driven scorer.

They stand in for the policy and the reward model in pure unit tests, so that what a strategy
picks can be checked against hand-made candidate sets with known answers and scores.
"""

from __future__ import annotations

from collections.abc import Sequence

from assay.search.base import Generation, GenParams, Score, step_ends


class ScriptedGenerator:
    """Test double: answers every call with the next responses of a fixed list, in order (cycling).

    Every response costs `tokens` tokens (at most the call's max_tokens) and ends with "stop".
    Records the (texts, n, params) of every call.
    """

    weight_version = "scripted:v1"

    def __init__(self, responses: Sequence[str], tokens: int = 10) -> None:
        self.responses = list(responses)
        self.tokens = tokens
        self.calls: list[tuple[list[str], int, GenParams]] = []
        self._next = 0

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        self.calls.append((list(texts), n, params))
        out = []
        for _ in texts:
            row = []
            for _ in range(n):
                text = self.responses[self._next % len(self.responses)]
                self._next += 1
                row.append(Generation(text, min(self.tokens, params.max_tokens), "stop"))
            out.append(row)
        return out


class TreeGenerator:
    """Test double: a policy over a fixed tree of steps. `tree[prefix]` lists the next steps
    after response prefix `prefix`, handed out in turn; a step ending in the stop string is an
    open step ("step"), any other ends the response ("stop"). Each step costs `tokens` tokens."""

    weight_version = "tree:v1"

    def __init__(self, prompt: str, tree: dict[str, list[str]], tokens: int = 4) -> None:
        self.prompt = prompt
        self.tree = tree
        self.tokens = tokens
        self.turn: dict[str, int] = {}
        self.calls = 0

    def generate(self, texts: Sequence[str], n: int, params: GenParams) -> list[list[Generation]]:
        self.calls += 1
        out = []
        for text in texts:
            prefix = text[len(self.prompt) :]
            row = []
            for _ in range(n):
                options = self.tree[prefix]
                step = options[self.turn.get(prefix, 0) % len(options)]
                self.turn[prefix] = self.turn.get(prefix, 0) + 1
                reason = "step" if any(step.endswith(s) for s in params.stop) else "stop"
                row.append(Generation(step, min(self.tokens, params.max_tokens), reason))
            out.append(row)
        return out


class TableScorer:
    """Test double: a reward read from a table, response -> score (missing responses fail).

    With `steps`, granularity "steps" answers per-step scores: `steps[prefix]` is the score of
    the step that ends `prefix` (as `search.base.step_ends` cuts the response), value their min.
    """

    def __init__(
        self, table: dict[str, float], steps: dict[str, float] | None = None, reward_id: str = "table:v1"
    ) -> None:
        self.table = table
        self.steps = steps or {}
        self.reward_id = reward_id
        self.calls: list[tuple[list[tuple[str, str]], str, str | None]] = []

    def score(self, items, granularity="outcome", reference=None):
        self.calls.append((list(items), granularity, reference))
        out = []
        for _, response in items:
            if granularity == "steps" and self.steps:
                steps = tuple(self.steps[response[:end]] for end in step_ends(response))
                out.append(Score(min(steps), steps))
            elif response in self.table:
                out.append(Score(self.table[response]))
            else:
                out.append(Score(None, error="not in the table"))
        return out, self.reward_id
