"""The peers' reward protocols, over the same `RewardService` as /v1/score.

Each route translates a peer's request into the service's (`ScoreRequest`, or whole texts for
vLLM's pooling shapes) and its answer back, so it keeps every promise of /v1/score: the `score`
scope's key, the body and item limits, the deadline, metrics under the route's name, work
cancelled when the client hangs up, and a failed item that never becomes a number.

- `POST /compat/openrlhf/{reward}` (OpenRLHF's `--remote_rm_url`): `query` is prompt and response
  decoded as one text, special tokens and all; it must start with its entry of `prompts` (after
  any of the strip tokens in front: a decoded left padding or start of sequence), and what
  follows, less the strip tokens at its end (end of sequence, padding), is the response.
  `labels` are the references. An empty batch (OpenRLHF sent one to every URL after the first)
  answers empty lists. OpenRLHF has no null reward, so a failed item fails the call: 503 with
  Retry-After (its client retries), or 400 for an item that cannot be scored (`invalid_input`,
  `too_long`), with the item's error in the body; with `--openrlhf-failed-reward X` the item
  gets X instead, and 1 in `extra_logs["assay_failed"]`.
- `POST /compat/slime/{reward}` (slime's `remote_rm`, `--reward-key score`): one item, answered
  `{"score", "reward", "reward_id"}`; a failed item is the same 503 or 400 with the error, which
  slime's client retries and then raises: it never reads a failure as a score.
- `POST /classify`, `POST /pooling` (vLLM), `POST /v1/embeddings` (SGLang's reward shape, which
  veRL's reward loop reads): `model` names the reward; the text is the whole text the reward model
  reads (a chat `messages` list is rendered with the reward model's own chat template), so only
  `model.outcome` rewards serve them. `use_activation` (vLLM's meaning: apply the classifier's
  activation, a sigmoid for one label): null gives the reward's own scores (its spec's
  `activation`), true the sigmoid of the logit, false the logit; `/v1/embeddings` gives the
  logit, as SGLang does.
- `POST /compat/vllm/score`: vLLM's `/score` (`text_1` against `text_2`), on a path of its own so
  that it cannot be taken for Assay's `/v1/score`: `text_1` is the prompt and `text_2` the
  response, through the reward's own template, for any pointwise reward.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, Response
from jinja2 import TemplateError
from pydantic import BaseModel, ValidationError

from assay.base.disconnect import unless_disconnected
from assay.base.errors import InvalidRequest, ServiceError
from assay.base.metrics import Timer
from assay.chat import NoChatTemplate, render_exchange
from assay.rm_server.compat_protocol import (
    ClassificationData,
    ClassificationResponse,
    EmbeddingData,
    EmbeddingResponse,
    OpenRLHFRequest,
    OpenRLHFResponse,
    PoolingData,
    PoolingRequest,
    PoolingResponse,
    ScoreData,
    SlimeRequest,
    SlimeResponse,
    Usage,
    VllmScoreRequest,
    VllmScoreResponse,
)
from assay.rm_server.config import Compat
from assay.rm_server.metrics import UNKNOWN
from assay.rm_server.protocol import ErrorInfo, ErrorResponse, ErrorType, ScoreItem, ScoreRequest, ScoreResponse
from assay.rm_server.rewards import ItemFailure
from assay.rm_server.rewards.base import sigmoid
from assay.rm_server.rewards.model import ModelReward
from assay.rm_server.serving import RewardService
from assay.rm_server.spec import OutcomeModelSpec

RETRY_AFTER_S = 1  # a failed item is retried soon: most failures (timeout, overload) pass
UNSCORABLE = {ErrorType.invalid_input, ErrorType.too_long}  # a retry cannot help these: 400, not 503


def failure_status(error: ErrorInfo) -> tuple[int, dict[str, str] | None]:
    """How a peer without a null score hears of a failed item: 400, or 503 with Retry-After."""
    if error.type in UNSCORABLE:
        return 400, None
    return 503, {"Retry-After": str(RETRY_AFTER_S)}


def _strip_front(text: str, tokens: Sequence[str]) -> str:
    while found := next((t for t in tokens if text.startswith(t)), None):
        text = text[len(found) :]
    return text


def _strip_end(text: str, tokens: Sequence[str]) -> str:
    while found := next((t for t in tokens if text.endswith(t)), None):
        text = text[: -len(found)]
    return text


def split_query(index: int, query: str, prompt: str, strip: Sequence[str]) -> str:
    """The response in an OpenRLHF `query`: what follows `prompt`, less the strip tokens at its end."""
    if not query.startswith(prompt):
        query = _strip_front(query, strip)
        if not query.startswith(prompt):
            raise InvalidRequest(
                f"query {index} does not start with its prompt (prompts[{index}]), even after the strip tokens in "
                "front; send the prompt exactly as the policy saw it"
            )
    return _strip_end(query[len(prompt) :], strip)


def score_item(**fields: Any) -> ScoreItem:
    """An item of /v1/score from a peer's fields; what it cannot be is the request's fault (400)."""
    try:
        return ScoreItem(**fields)
    except ValidationError as exc:
        raise InvalidRequest(f"item {fields.get('id')}: {exc.errors()[0]['msg']}") from None


def add_compat_routes(
    app: FastAPI, service: RewardService, compat: Compat, dependencies: list[Any], errors: dict[int | str, Any]
) -> None:
    """Register the peers' routes on `app`; `dependencies`: the `score` scope's key check; `errors`:
    the error replies each route documents."""
    metrics = service.metrics

    async def timed(
        route: str, name: str | None, request: Request, work: Callable[[Timer], Awaitable[BaseModel | Response]]
    ) -> Any:
        with Timer(metrics, route, metrics.reward_label(name or UNKNOWN)) as timer:
            return await unless_disconnected(request, work(timer), timer)

    def failed(timer: Timer, error: ErrorInfo) -> JSONResponse:
        """A failed item's answer, for peers that have no failed score: an error status."""
        status, headers = failure_status(error)
        timer.code = str(status)
        return JSONResponse(ErrorResponse(error=error).model_dump(mode="json"), status_code=status, headers=headers)

    # --- OpenRLHF --------------------------------------------------------------------------

    @app.post("/compat/openrlhf/{reward}", response_model=OpenRLHFResponse, responses=errors, dependencies=dependencies)
    async def openrlhf(
        reward: str,
        req: OpenRLHFRequest,
        request: Request,
        strip: Annotated[
            list[str] | None,
            Query(description="The strip tokens for this request (repeatable), instead of the server's."),
        ] = None,
    ) -> Any:
        tokens = tuple(t for t in strip or compat.openrlhf_strip_tokens if t)

        async def work(timer: Timer) -> OpenRLHFResponse | JSONResponse:
            labels = req.labels if req.labels is not None else [None] * len(req.query)
            if not len(req.query) == len(req.prompts) == len(labels):
                raise InvalidRequest(
                    f"query, prompts and labels must be as long as each other, not {len(req.query)}, "
                    f"{len(req.prompts)} and {len(labels)}"
                )
            reward_id = service.reward(reward).reward_id
            if not req.query:  # OpenRLHF sends an empty shard to every URL after the first
                return OpenRLHFResponse(
                    rewards=[],
                    scores=[],
                    extra_logs={"assay_failed": []},
                    reward=reward,
                    reward_id=reward_id,
                    errors=[],
                )
            items = [
                score_item(id=str(i), prompt=p, response=split_query(i, q, p, tokens), reference=label)
                for i, (q, p, label) in enumerate(zip(req.query, req.prompts, labels, strict=True))
            ]
            out = await service.score(ScoreRequest(reward=reward, items=items))
            values, flags = [], []
            for i, r in enumerate(out.results):
                if r.error is None:
                    assert r.score is not None, "a result without an error has a score"
                    values.append(r.score)
                    flags.append(0.0)
                elif compat.openrlhf_failed_reward is None:
                    error = ErrorInfo(type=r.error.type, message=f"item {i}: {r.error.message}")
                    return failed(timer, error)
                else:
                    values.append(compat.openrlhf_failed_reward)
                    flags.append(1.0)
            return OpenRLHFResponse(
                rewards=values,
                scores=values,
                extra_logs={"assay_failed": flags},
                reward=reward,
                reward_id=out.reward_id,
                errors=[r.error for r in out.results],
            )

        return await timed("/compat/openrlhf/{reward}", reward, request, work)

    # --- slime -----------------------------------------------------------------------------

    @app.post("/compat/slime/{reward}", response_model=SlimeResponse, responses=errors, dependencies=dependencies)
    async def slime(reward: str, req: SlimeRequest, request: Request) -> Any:
        async def work(timer: Timer) -> SlimeResponse | JSONResponse:
            text, conversation = (req.prompt, None) if isinstance(req.prompt, str) else (None, req.prompt)
            item = score_item(id="0", prompt=text, messages=conversation, response=req.response, reference=req.label)
            out = await service.score(ScoreRequest(reward=reward, items=[item]))
            r = out.results[0]
            if r.error is not None:
                error = ErrorInfo(type=r.error.type, message=f"reward {reward!r} ({out.reward_id}): {r.error.message}")
                return failed(timer, error)
            assert r.score is not None, "a result without an error has a score"
            return SlimeResponse(score=r.score, reward=reward, reward_id=out.reward_id)

        return await timed("/compat/slime/{reward}", reward, request, work)

    # --- vLLM's pooling shapes, SGLang's embeddings ----------------------------------------

    def model_reward(model: str | None) -> str:
        """The reward a vLLM-style `model` names: a reward's name, or its checkpoint's path (vLLM's
        default model name); none: the one outcome model reward served."""
        outcome = {n: r for n, r in service.rewards.items() if isinstance(r, ModelReward) and not r.process}
        if model is None:
            if len(outcome) == 1:
                return next(iter(outcome))
            raise InvalidRequest(f"name the reward in `model`: this server has model rewards {', '.join(outcome)}")
        if model in service.rewards:
            return model
        by_path = [n for n, r in outcome.items() if str(r.path).rstrip("/") == model.rstrip("/")]
        return by_path[0] if by_path else service.reward(model).name  # the latter: 404 naming the rewards

    def label(model: str | None) -> str | None:
        """The metrics label of a vLLM-style request: its reward, or none when `model` names none."""
        try:
            return model_reward(model)
        except ServiceError:
            return None

    async def logits(req: PoolingRequest, name: str) -> tuple[ModelReward, list[float], int]:
        """Each input's logit, and the tokens read; a failed input fails the call (vLLM has no
        per-input error), 503 or 400 as `failure_status` says."""
        if req.truncate_prompt_tokens not in (None, -1):
            raise InvalidRequest("truncate_prompt_tokens is not supported: the reward's spec says how it truncates")
        reward = service.reward(name)
        if (req.input is None) == (req.messages is None):
            raise InvalidRequest("give exactly one of `input` (text, or a list of texts) and `messages`")
        if req.messages is not None:
            if not isinstance(reward, ModelReward) or reward.tokenizer is None:
                texts: list[str] = []  # score_texts refuses this reward, naming why
            else:
                try:
                    texts = [render_exchange(reward.tokenizer, [m.model_dump() for m in req.messages], [])]
                except (NoChatTemplate, TemplateError) as exc:  # a template's raise_exception: roles, order
                    raise InvalidRequest(f"reward {name!r} cannot render these messages: {exc}") from None
            special = bool(req.add_special_tokens)  # vLLM's chat default: the template writes them
        else:
            texts = [req.input] if isinstance(req.input, str) else list(req.input or [])
            special = req.add_special_tokens is not False
        model, outcomes = await service.score_texts(name, texts, add_special_tokens=special)
        values = []
        for i, (o, _) in enumerate(outcomes):
            if isinstance(o, ItemFailure):
                raise _InputFailed(ErrorInfo(type=o.type, message=f"input {i}: {o.message}"))
            values.append(o.value)
        return model, values, sum(n for _, n in outcomes)

    def activated(model: ModelReward, logit: float, choice: bool | None) -> float:
        own = isinstance(model.spec, OutcomeModelSpec) and model.spec.activation == "sigmoid"
        return sigmoid(logit) if (choice if choice is not None else own) else logit

    async def pooled(
        route: str, req: PoolingRequest, request: Request, build: Callable[[str, ModelReward, list[float], Usage], Any]
    ) -> Any:
        async def work(timer: Timer) -> Any:
            name = model_reward(req.model)
            try:
                model, values, tokens = await logits(req, name)
            except _InputFailed as exc:
                return failed(timer, exc.error)
            return build(name, model, values, Usage(prompt_tokens=tokens, total_tokens=tokens))

        return await timed(route, label(req.model), request, work)

    @app.post("/classify", response_model=ClassificationResponse, responses=errors, dependencies=dependencies)
    async def classify(req: PoolingRequest, request: Request) -> Any:
        def build(name: str, model: ModelReward, values: list[float], usage: Usage) -> ClassificationResponse:
            choice = req.activation_choice()
            data = [
                ClassificationData(index=i, label=None, probs=[activated(model, v, choice)], num_classes=1)
                for i, v in enumerate(values)
            ]
            return ClassificationResponse(model=name, data=data, usage=usage, reward_id=model.reward_id)

        return await pooled("/classify", req, request, build)

    @app.post("/pooling", response_model=PoolingResponse, responses=errors, dependencies=dependencies)
    async def pooling(req: PoolingRequest, request: Request) -> Any:
        def build(name: str, model: ModelReward, values: list[float], usage: Usage) -> PoolingResponse:
            choice = req.activation_choice()
            data = [PoolingData(index=i, data=[activated(model, v, choice)]) for i, v in enumerate(values)]
            return PoolingResponse(model=name, data=data, usage=usage, reward_id=model.reward_id)

        return await pooled("/pooling", req, request, build)

    @app.post("/v1/embeddings", response_model=EmbeddingResponse, responses=errors, dependencies=dependencies)
    async def embeddings(req: PoolingRequest, request: Request) -> Any:
        def build(name: str, model: ModelReward, values: list[float], usage: Usage) -> EmbeddingResponse:
            data = [EmbeddingData(index=i, embedding=[v]) for i, v in enumerate(values)]  # SGLang: the logit
            return EmbeddingResponse(model=name, data=data, usage=usage, reward_id=model.reward_id)

        return await pooled("/v1/embeddings", req, request, build)

    # --- vLLM's /score ---------------------------------------------------------------------

    @app.post("/compat/vllm/score", response_model=VllmScoreResponse, responses=errors, dependencies=dependencies)
    async def vllm_score(req: VllmScoreRequest, request: Request) -> Any:
        async def work(timer: Timer) -> VllmScoreResponse | JSONResponse:
            name = model_reward(req.model)
            if any(v is not None for v in (req.use_activation, req.activation, req.softmax)):
                raise InvalidRequest("use_activation is not supported here: this route gives the reward's own scores")
            pairs = _pairs(req.text_1, req.text_2)
            items = [score_item(id=str(i), prompt=p, response=r) for i, (p, r) in enumerate(pairs)]
            out: ScoreResponse = await service.score(ScoreRequest(reward=name, items=items))
            data = []
            for i, r in enumerate(out.results):
                if r.error is not None:
                    error = ErrorInfo(type=r.error.type, message=f"pair {i}: {r.error.message}")
                    return failed(timer, error)
                assert r.score is not None, "a result without an error has a score"
                data.append(ScoreData(index=i, score=r.score))
            usage = Usage(prompt_tokens=0, total_tokens=0)  # not counted: a rule or judge reads no tokens here
            return VllmScoreResponse(model=name, data=data, usage=usage, reward_id=out.reward_id)

        return await timed("/compat/vllm/score", label(req.model), request, work)


class _InputFailed(Exception):
    def __init__(self, error: ErrorInfo) -> None:
        super().__init__(error.message)
        self.error = error


def _pairs(text_1: str | list[str], text_2: str | list[str]) -> list[tuple[str, str]]:
    """vLLM's pairing: one to one, one to many, or two lists of one length."""
    firsts = [text_1] if isinstance(text_1, str) else text_1
    seconds = [text_2] if isinstance(text_2, str) else text_2
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds) or not seconds:
        raise InvalidRequest(
            f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: send one text_1, or as many as text_2"
        )
    return list(zip(firsts, seconds, strict=True))
