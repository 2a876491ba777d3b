"""Test double of a served model: a generation backend that answers with scripted texts.

For `/v1/search` tests that need responses the tiny checkpoints cannot write (`\\boxed{}` answers,
GSM8K-style numbers): the server, its HTTP path, the search and its vote are the real ones; only
the model is scripted. It tokenizes with a real tokenizer, so token counts (the budget, max_tokens)
are what the server would count, and it records the prompt of every sequence it was asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from assay.policy_server.backends import GenerationBackend, GenerationOutput, GenerationRequest


class ScriptedBackend(GenerationBackend):
    """Sequence k (over all calls) is `responses[k % len(responses)]`, ended by eos ("stop")."""

    def __init__(self, name: str, tokenizer: Any, responses: Sequence[str], max_model_len: int = 1024) -> None:
        self.name = name
        self.tokenizer = tokenizer
        self.responses = list(responses)
        self.max_model_len = max_model_len
        self.prompts: list[list[int]] = []  # the prompt ids of every sequence, in order
        self._next = 0

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationOutput]:
        out = []
        for r in requests:
            text = self.responses[self._next % len(self.responses)]
            self._next += 1
            self.prompts.append(list(r.prompt_ids))
            ids = [*self.tokenizer(text, add_special_tokens=False)["input_ids"], self.tokenizer.eos_token_id]
            assert len(ids) <= r.max_tokens, f"scripted response {text!r} is over the request's max_tokens"
            out.append(GenerationOutput(ids, [0.0] * len(ids), text, "stop", self.weight_version))
        return out
