"""The serving layer of `/v1/search`: validate, run a search strategy over a served model, answer.

    POST /v1/search {"prompt": "Q: 23+45-17 A: ", "strategy": "best_of_n", "n": 8, "reward": "orm"}

A strategy from `search.STRATEGIES` runs on a worker thread of this service (strategies are
blocking code; model work never runs on the event loop). It generates through a
`BackendGenerator` over the served model, which hands its sequences back to the loop's batcher,
and scores with `search.remote.RemoteScorer` over one shared `clients.RewardClient` to rm_server.

A task sent as `messages` is rendered with the served model's chat template (the assistant turn
opened), as `/v1/chat/completions` renders it, and the search continues that text (tokenized
without adding special tokens: the template wrote its own). The reward is sent the conversation,
not the rendering, so a reward model with its own tokenizer and template (`chat_template: true`)
scores the text it was trained on. The response's `prompt` is the rendering, for the record. The
request's `answer` (`assay.answers.Extract`) is how votes and `correct` find final answers.

Errors: a bad request is a 400 before anything runs (unknown strategy, n or budget over the
limits, a strategy that needs a reward and got none). rm_server's failures keep their meaning:
an unknown reward is its 404 with its message, unreachable is 503, overloaded 429, its deadline
504, anything else from it 502. A cancelled request (client gone, deadline) aborts the search's
sequences in flight and makes its next generate call fail, so the thread ends soon after.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields

from jinja2.exceptions import TemplateError

from assay.chat import DroppedMessages, NoChatTemplate
from assay.clients import errors as rm
from assay.clients.reward import RewardClient
from assay.policy_server.backends import GenerationBackend, GenerationFailed, InvalidParameters, Overloaded
from assay.policy_server.errors import (
    ApiError,
    BadGateway,
    Conflict,
    DeadlineExceeded,
    InvalidRequest,
    ModelNotFound,
    NotReady,
    QueueFull,
    Unavailable,
    backend_error,
)
from assay.policy_server.generator import BackendGenerator, ContextFull, SearchCancelled, TooManySequences
from assay.policy_server.protocol import SearchRequest, SearchResponse
from assay.policy_server.serving import PolicyService, maybe_off_loop
from assay.search import STRATEGIES, Budget, SearchConfig, SearchError, SearchResult
from assay.search.remote import RemoteScorer

NO_REWARD = frozenset({"majority"})  # strategies that score nothing
# the SearchConfig fields a request may set (seed and budget are set apart)
_CONFIG_FIELDS = tuple(
    f.name for f in fields(SearchConfig) if f.name in SearchRequest.model_fields and f.name not in ("seed", "budget")
)
_SEEDS = 2**31


class SearchService:
    """Runs searches for the HTTP adapter; owns the search threads and the rm_server client."""

    def __init__(self, policy: PolicyService, rewards: RewardClient, rm_url: str) -> None:
        self.policy, self.rewards, self.rm_url = policy, rewards, rm_url
        self.limits = policy.limits
        self._executor = ThreadPoolExecutor(self.limits.max_searches, thread_name_prefix="search")
        self._slots = threading.BoundedSemaphore(self.limits.max_searches)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.rewards.close()

    async def search(self, req: SearchRequest) -> SearchResponse:
        backend = self.policy.backend(req.model)
        self._check_strategy(req)
        seed = req.seed if req.seed is not None else random.randrange(_SEEDS)
        config = self._config(req, seed)
        messages = None if req.messages is None else [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = req.prompt if messages is None else await self._render(backend, messages)
        assert prompt is not None  # the request holds a prompt or messages (its validator)
        chat = messages is not None  # a rendered conversation holds its own special tokens
        ids = await maybe_off_loop(len(prompt), functools.partial(backend.encode, add_special_tokens=not chat), prompt)
        self.policy.check_lengths(backend, [ids], config.max_tokens, "max_tokens")
        generator = BackendGenerator(
            backend, asyncio.get_running_loop(), max_sequences=self.limits.max_sequences, add_special_tokens=not chat
        )
        # _check_strategy refused a missing reward for every strategy that scores; with messages,
        # the reward is sent the conversation, so a reward model renders it with its own template
        scorer = (
            None
            if req.strategy in NO_REWARD or req.reward is None
            else RemoteScorer(self.rewards, req.reward, messages=messages)
        )

        if not self._slots.acquire(blocking=False):
            raise QueueFull(
                f"{self.limits.max_searches} searches are running, the most this server runs at once",
                code="queue_full",
                retry_after_s=1.0,
            )
        job = self._executor.submit(self._run, req, prompt, generator, scorer, config)
        job.add_done_callback(lambda _: self._slots.release())  # also when cancelled before it started
        waiting = asyncio.wrap_future(job)
        try:
            done, _ = await asyncio.wait([waiting], timeout=self.limits.timeout_s)
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            generator.cancel()
            waiting.cancel()
            raise
        if not done:
            generator.cancel()
            waiting.cancel()
            raise DeadlineExceeded(f"the search did not finish within {self.limits.timeout_s:g}s", code="timeout")
        try:
            result = waiting.result()
        except Exception as exc:
            mapped = _api_error(exc, self.rm_url, backend)
            if mapped is None:
                raise  # a bug: the adapter answers 500
            raise mapped from exc
        return self._response(req, result, generator, seed, None if messages is None else prompt)

    def _run(
        self,
        req: SearchRequest,
        prompt: str,
        generator: BackendGenerator,
        scorer: RemoteScorer | None,
        config: SearchConfig,
    ) -> SearchResult:
        """On a search thread: check the reward exists (before spending generation on it), then search."""
        if scorer is not None:
            self.rewards.reward_id(scorer.reward)
        return STRATEGIES[req.strategy](prompt, generator, scorer, config, reference=req.reference)

    async def _render(self, backend: GenerationBackend, messages: list[dict[str, str]]) -> str:
        """The conversation as the model's chat template renders it, the assistant turn opened."""
        try:
            return await maybe_off_loop(sum(len(m["content"]) for m in messages), backend.chat_text, messages)
        except (NoChatTemplate, DroppedMessages) as exc:
            raise InvalidRequest(f"model {backend.name!r}: {exc}", param="messages") from None
        except TemplateError as exc:  # templates raise on what they cannot render (roles, order)
            raise InvalidRequest(f"the chat template refused these messages: {exc}", param="messages") from None

    # --- validation ----------------------------------------------------------------------

    def _check_strategy(self, req: SearchRequest) -> None:
        if req.strategy not in STRATEGIES:
            raise InvalidRequest(
                f"unknown strategy {req.strategy!r}; this server has {', '.join(STRATEGIES)}",
                param="strategy",
                code="unknown_strategy",
            )
        if req.reward is None and req.strategy not in NO_REWARD:
            raise InvalidRequest(
                f"strategy {req.strategy!r} scores candidates: name an rm_server reward in `reward`", param="reward"
            )

    def _config(self, req: SearchRequest, seed: int) -> SearchConfig:
        """The request's SearchConfig, within this server's limits; a budget field left out gets the cap."""
        lim = self.limits
        values = {name: getattr(req, name) for name in _CONFIG_FIELDS if getattr(req, name) is not None}
        if "stop" in values:
            if not values["stop"] or any(not s for s in values["stop"]) or len(values["stop"]) > lim.max_stop:
                raise InvalidRequest(f"`stop` needs 1 to {lim.max_stop} non-empty strings", param="stop")
            values["stop"] = tuple(values["stop"])
        budget = {}
        for name, cap in (("max_candidates", lim.max_search_candidates), ("max_tokens", lim.max_search_tokens)):
            asked = None if req.budget is None else getattr(req.budget, name)
            if asked is not None and asked > cap:
                raise InvalidRequest(f"budget.{name}={asked} is more than the limit of {cap}", param="budget")
            budget[name] = cap if asked is None else asked
        try:
            config = SearchConfig(**values, seed=seed, budget=Budget(**budget))
        except ValueError as exc:  # SearchConfig's own checks say what to change
            raise InvalidRequest(str(exc)) from None
        for name, limit in (
            ("n", lim.max_n),
            ("round_size", lim.max_n),
            ("beam_width", lim.max_n),
            ("max_tokens", lim.max_tokens),
            ("max_step_tokens", lim.max_tokens),
        ):
            if getattr(config, name) > limit:
                raise InvalidRequest(f"{name}={getattr(config, name)} is more than the limit of {limit}", param=name)
        return config

    # --- the response --------------------------------------------------------------------

    def _response(
        self, req: SearchRequest, result: SearchResult, generator: BackendGenerator, seed: int, rendered: str | None
    ) -> SearchResponse:
        body = result.to_dict()
        body["weight_version"] = min(generator.versions) if generator.versions else None  # an int on the wire
        return SearchResponse(
            id=f"search-{uuid.uuid4().hex}",
            created=int(time.time()),
            model=req.model,
            reward=req.reward if result.reward_id is not None else None,
            seed=seed,
            prompt=rendered,
            **body,
        )


def _api_error(exc: Exception, rm_url: str, backend: GenerationBackend) -> ApiError | None:
    """What a failed search becomes on the wire (None: a bug); the one place search failures are mapped."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, rm.UnknownReward):
        return ModelNotFound(f"rm_server at {rm_url}: {exc.message}", param="reward", code="reward_not_found")
    if isinstance(exc, rm.InvalidRequest):
        return InvalidRequest(f"rm_server at {rm_url} refused the scoring request: {exc}", code="reward_refused")
    if isinstance(exc, rm.Unavailable):
        return Unavailable(
            f"the reward service (rm_server at {rm_url}) is unavailable: {exc}", code="reward_service_unavailable"
        )
    if isinstance(exc, rm.Overloaded):
        return QueueFull(
            f"the reward service (rm_server at {rm_url}) is overloaded: {exc}",
            code="reward_service_overloaded",
            retry_after_s=exc.retry_after_s or 1.0,
        )
    if isinstance(exc, rm.DeadlineExceeded):
        return DeadlineExceeded(
            f"the reward service (rm_server at {rm_url}) did not answer in time: {exc}", code="reward_service_timeout"
        )
    if isinstance(exc, rm.RewardServiceError):  # ServerError, or this server's rm credentials refused
        return BadGateway(f"the reward service (rm_server at {rm_url}) failed: {exc}", code="reward_service_error")
    if isinstance(exc, (Overloaded, GenerationFailed, InvalidParameters)):
        return backend_error(exc)
    if isinstance(exc, (ContextFull, TooManySequences)):
        return InvalidRequest(f"model {backend.name!r}: {exc}")
    if isinstance(exc, SearchCancelled):
        return NotReady(f"the search stopped: {exc}", code="cancelled")
    if isinstance(exc, SearchError):  # e.g. rm_server's reward changed (reloaded) mid-search
        return Conflict(f"the search could not go on: {exc}", code="search_failed")
    return None
