"""An LLM judge behind an OpenAI-compatible endpoint (vLLM, the policy server, a hosted API).

`api: completions` (default) posts one prompt to `/v1/completions`; `api: chat` posts a system
message with the rubric and a user message with the data to `/v1/chat/completions` (what and how:
`judge_prompts`). Six modes, all at temperature 0, one HTTP request per prompt:

- `yes_prob`: score = P(yes) / (P(yes) + P(no)) from the first generated token's top logprobs.
  A token counts for a word when its stripped, lower-cased text is a non-empty prefix of it, so
  the embedded char-level verifier's "y" and a word-level model's " Yes" both count.
- `verdict`: the judge writes up to max_tokens tokens; 1.0 if the first yes/no word is yes, 0.0
  if no (for endpoints without logprobs).
- `expected_score`: the expectation over the integer tokens in [score_min, score_max] among the
  first token's top logprobs, renormalised. Known limitation: a score a tokenizer splits over
  several tokens (`10` as `1`,`0`) is read as its first token only.
- `text_score`: the judge writes up to max_tokens tokens; the first number in the text is the score.
- `pairwise`: P(A) vs P(B) from the first token, asked in both orders to cancel position bias.
- `pairwise_verdict`: the judge writes A or B, asked in both orders (prob_a is 0, 0.5 or 1).

The response under judgement is untrusted: `sanitize` strips control tokens and the template's
own delimiters and (with one_line) newlines, so it cannot close its block or forge the answer
marker. A failed call is an `ItemFailure` for that item only, never a score of 0.

The connection is what every reward on another server shares (`endpoint.Endpoint`: the key, its
check at start-up, concurrency, deadlines, retries, typed failures). At start the judge asks its
endpoint's `/models` with its key: a refused key (401, 403) stops the service (`JudgeKeyRefused`,
naming the judge); an endpoint that does not answer yet is fine (the policy server it points at
may start later), and until then the judge's items fail typed as `judge_unavailable`. Its id
names the endpoint, model and prompt, not the judge's weights (`pinned` is false).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import Any

from assay.rm_server.protocol import ErrorType, Granularity
from assay.rm_server.rewards.base import Compared, Item, ItemFailure, Outcome, Reward, Scored, until_deadline
from assay.rm_server.rewards.endpoint import Endpoint, KeyRefused
from assay.rm_server.rewards.judge_prompts import (
    SNIPPET,
    expected_score,
    judged_prompt,
    parse_score,
    parse_verdict,
    render,
    resolved_system,
    resolved_template,
    sanitize,
    two_way,
)
from assay.rm_server.spec import JudgeSpec

PAIRWISE_MODES = ("pairwise", "pairwise_verdict")
TEXT_MODES = ("text_score", "verdict", "pairwise_verdict")  # read what the judge writes, not logprobs


class JudgeKeyRefused(KeyRefused):
    """The judge's endpoint refuses its key: fix the key, then start the service."""


class JudgeReward(Reward):
    """Scores (or compares) responses by asking an LLM through its completions or chat endpoint."""

    type = "judge"
    needs_reference = False
    pinned = False
    granularities = frozenset({Granularity.outcome})

    def __init__(self, name: str, reward_id: str, spec: JudgeSpec) -> None:
        super().__init__(name, reward_id)
        self.spec = spec
        self.template = resolved_template(spec)
        self.system = resolved_system(spec)
        self.pairwise = spec.mode in PAIRWISE_MODES
        needed = ("{response_a}", "{response_b}") if self.pairwise else ("{response}",)
        missing = [p for p in needed if p not in self.template]
        if missing:
            raise ValueError(f"judge {name!r}: a {spec.mode} template needs {', '.join(missing)}")
        self.endpoint = Endpoint(
            f"judge {name!r}",
            "judge endpoint",
            api_key_env=spec.api_key_env,
            timeout_s=spec.timeout_s,
            max_concurrency=spec.max_concurrency,
            retries=spec.retries,
            unavailable=ErrorType.judge_unavailable,
            error=ErrorType.judge_error,
            refused=JudgeKeyRefused,
        )

    async def start(self) -> None:
        await self.endpoint.start(f"{self.spec.endpoint}/models")

    async def close(self) -> None:
        await self.endpoint.close()

    def queue_depth(self) -> int:
        return self.endpoint.pending

    async def score(self, items: Sequence[Item], granularity: Granularity) -> list[Outcome]:
        if self.pairwise:
            return [ItemFailure(ErrorType.invalid_input, "pairwise judge; use compare")] * len(items)
        if granularity != Granularity.outcome:
            why = f"a judge scores outcomes, not {granularity.value}"
            return [ItemFailure(ErrorType.invalid_input, why)] * len(items)
        return _raise_bugs(await until_deadline([self._score_one(item) for item in items]))

    async def compare(self, items: Sequence[tuple[Item, Item]]) -> list[Compared | ItemFailure]:
        """Pairwise mode: ask in both orders; other modes: the pointwise default (base class).

        With q1 = P("A") when a sits in slot A and q2 = P("A") when b sits in slot A (so a wins
        there when the judge says "B"): prob_a = (q1 + (1 - q2)) / 2. Swapping a and b swaps q1
        and q2, so prob_a(a, b) + prob_a(b, a) = 1 and a pure position bias cancels.
        """
        if not self.pairwise:
            return await super().compare(items)
        return _raise_bugs(await until_deadline([self._compare_one(a, b) for a, b in items]))

    # --- one item ----------------------------------------------------------------------------

    async def _score_one(self, item: Item) -> Outcome:
        spec = self.spec
        prompt = render(
            self.template,
            prompt=judged_prompt(item.prompt, spec),
            response=sanitize(item.response, spec),
        )
        try:
            if spec.mode in TEXT_MODES:
                text = self._text(await self._post(prompt, spec.max_tokens, logprobs=False))
                if spec.mode == "verdict":
                    return Scored(parse_verdict(text, spec.yes, spec.no))
                return Scored(parse_score(text, spec.score_min, spec.score_max))
            top = self._first_top_logprobs(await self._post(prompt, 1))
            if spec.mode == "yes_prob":
                return Scored(two_way(top, spec.yes, spec.no))
            return Scored(expected_score(top, spec.score_min, spec.score_max))
        except ItemFailure as failure:
            return failure

    async def _compare_one(self, a: Item, b: Item) -> Compared | ItemFailure:
        p = judged_prompt(a.prompt, self.spec)
        ra, rb = sanitize(a.response, self.spec), sanitize(b.response, self.spec)
        orders = [render(self.template, prompt=p, response_a=x, response_b=y) for x, y in ((ra, rb), (rb, ra))]
        text = self.spec.mode in TEXT_MODES
        max_tokens = self.spec.max_tokens if text else 1
        asks = (self._post(order, max_tokens, logprobs=not text) for order in orders)
        answers = await asyncio.gather(*asks, return_exceptions=True)
        try:
            q1, q2 = (self._says_a(c, text) for c in answers)
        except ItemFailure as failure:
            return failure
        return Compared(prob_a=(q1 + (1.0 - q2)) / 2.0)

    def _says_a(self, choice: dict | BaseException, text: bool) -> float:
        """P("A") from one answer: its written verdict (1 or 0), or its first token's logprobs."""
        if isinstance(choice, BaseException):  # from gather(return_exceptions=True)
            raise choice
        if text:
            return parse_verdict(self._text(choice), "A", "B")
        return two_way(self._first_top_logprobs(choice), "A", "B")

    # --- the HTTP call -----------------------------------------------------------------------

    @property
    def _url(self) -> str:
        return f"{self.spec.endpoint}/{'chat/completions' if self.spec.api == 'chat' else 'completions'}"

    def _body(self, prompt: str, max_tokens: int, logprobs: bool) -> dict[str, Any]:
        """The request: `prompt` as the completion's prompt, or as the chat's user message after
        the rubric's system message (none when the system is "")."""
        body: dict[str, Any] = {"model": self.spec.model, "max_tokens": max_tokens, "temperature": 0}
        if self.spec.api == "completions":
            body["prompt"] = prompt
            if logprobs:
                body["logprobs"] = self.spec.top_logprobs
            return body
        system = [{"role": "system", "content": self.system}] if self.system else []
        body["messages"] = [*system, {"role": "user", "content": prompt}]
        if logprobs:
            body["logprobs"], body["top_logprobs"] = True, self.spec.top_logprobs
        return body

    async def _post(self, prompt: str, max_tokens: int, logprobs: bool = True) -> dict:
        """choices[0] of one completion; any failure of the endpoint is raised as an ItemFailure."""
        answer = await self.endpoint.post(self._url, self._body(prompt, max_tokens, logprobs))
        try:
            choice = answer["choices"][0]
        except (KeyError, IndexError, TypeError):
            why = f"judge endpoint {self._url} answered {str(answer)[:SNIPPET]!r} (no completion in it)"
            raise ItemFailure(ErrorType.judge_error, why) from None
        if not isinstance(choice, dict):
            raise ItemFailure(ErrorType.judge_error, f"judge endpoint {self._url}: choices[0] is not an object")
        return choice

    def _text(self, choice: dict) -> str:
        """What the judge wrote: choices[0].text, or choices[0].message.content for chat."""
        chat = self.spec.api == "chat"
        text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
        if not isinstance(text, str):
            where = "choices[0].message.content" if chat else "choices[0].text"
            raise ItemFailure(ErrorType.judge_error, f"{self._url}: {where} is missing")
        return text

    def _first_top_logprobs(self, choice: dict) -> dict[str, float]:
        """{token text: logprob} at the first generated token: completions' `logprobs.top_logprobs[0]`
        (a mapping), or chat's `logprobs.content[0].top_logprobs` (a list of {token, logprob})."""
        try:
            if self.spec.api == "chat":
                top = choice["logprobs"]["content"][0]["top_logprobs"]
                out = {str(e["token"]): float(e["logprob"]) for e in top}
            else:
                top = choice["logprobs"]["top_logprobs"][0]
                out = {str(t): float(lp) for t, lp in top.items()}
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            raise ItemFailure(
                ErrorType.judge_error, f"judge endpoint {self._url} sent no top_logprobs (does it support logprobs?)"
            ) from None
        if not out or not all(math.isfinite(lp) or lp == -math.inf for lp in out.values()):
            why = f"judge endpoint {self._url} sent unusable top_logprobs {str(top)[:SNIPPET]!r}"
            raise ItemFailure(ErrorType.judge_error, why)
        return out


def _raise_bugs(outcomes: list) -> list:
    """Failures of the judge are ItemFailures already; any other exception is a bug: raise it."""
    for o in outcomes:
        if isinstance(o, BaseException) and not isinstance(o, ItemFailure):
            raise o
    return outcomes
