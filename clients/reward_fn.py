"""TRL's reward-function form of a served reward: `f(prompts, completions, **kw) -> list[float | None]`.

`RewardClient.as_reward_fn` and `AsyncRewardClient.as_reward_fn` wrap a `RewardFnForm` around
their `score`: the form turns what TRL's GRPOTrainer passes into score items, and the reply back
into one value per completion. Pure: no I/O, shared by both clients.

What TRL passes, and what is sent for it:
- **Prompts**: a string is sent as `prompt`; a conversation (a list of `{"role", "content"}`
  messages, TRL's conversational format) as `messages`, whole, so that a reward with
  `chat_template: true` renders it with its own template. Sending only the last user message's
  text would score another text, silently.
- **Completions**: a string, or the content of the conversation's last assistant message.
- **The reference**: the dataset column named `reference_key`, or else the first of `reference`,
  `answer`, `solution`, `ground_truth` that TRL passed. A reward that needs a reference (as
  `GET /v1/rewards` says) and finds no such column is an error naming the columns there were. A
  row whose reference is None is not sent, and gets None: TRL's "no reward for this sample",
  for that row only.
- **Other columns** (every `**kw` entry with one value per completion, but TRL's own
  `completion_ids`, `trainer_state`, `log_extra`, `log_metric`, `environments`) travel as the
  item's `metadata`, each row's values that JSON can carry: strings, finite numbers, booleans,
  None, and lists and string-keyed dicts of them. Others (images, tensors, NaN) stay behind.

A failed item gives None too; a failed call raises. The function carries `.reward_id`, and
raises ServerError if a reply comes from a reward with another id.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import ValidationError

from assay.clients.errors import InvalidRequest, ServerError, problems
from assay.rm_server.protocol import ScoreItem, ScoreResponse

REFERENCE_KEYS = ("reference", "answer", "solution", "ground_truth")  # tried in this order
TRL_KWARGS = frozenset({"completion_ids", "trainer_state", "log_extra", "log_metric", "environments"})

RewardFn = Callable[..., list[float | None]]
T = TypeVar("T")


def _json_safe(value: Any) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_json_safe(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_safe(v) for k, v in value.items())
    return False


def _content(message: Any, what: str) -> str:
    if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
        raise InvalidRequest(f"{what} is not a chat message with a role: {message!r:.80}")
    if not isinstance(message.get("content"), str):
        raise InvalidRequest(f"{what} ({message['role']}) has no text content; only text is sent")
    return str(message["content"])


def _prompt(prompt: Any, what: str) -> dict[str, Any]:
    """A string as `prompt`; a conversation as `messages`, each its role and text (tool calls stay out)."""
    if isinstance(prompt, str):
        return {"prompt": prompt}
    if not isinstance(prompt, Sequence) or not prompt:
        raise InvalidRequest(f"{what} is neither a string nor a non-empty list of chat messages")
    return {
        "messages": [{"role": m["role"], "content": _content(m, f"{what}, message {j}")} for j, m in enumerate(prompt)]
    }


def _response(completion: Any, what: str) -> str:
    """A plain string, or the content of a conversation's last assistant message."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence):
        for j in reversed(range(len(completion))):
            if isinstance(completion[j], Mapping) and completion[j].get("role") == "assistant":
                return _content(completion[j], f"{what}, message {j}")
    raise InvalidRequest(f"{what} is neither a string nor a message list with an assistant message")


@dataclass(frozen=True)
class RewardFnForm:
    """How one reward's TRL reward function builds its items and reads its replies."""

    reward: str
    reward_id: str
    needs_reference: bool
    reference_key: str | None = None  # None: the first of REFERENCE_KEYS present

    def reference_column(self, kw: Mapping[str, Any]) -> str | None:
        """The name of the column that holds the references; None when there is none and none is needed."""
        candidates = (self.reference_key,) if self.reference_key is not None else REFERENCE_KEYS
        found = next((key for key in candidates if key in kw), None)
        if found is None and self.needs_reference:
            columns = ", ".join(repr(k) for k in kw if k not in TRL_KWARGS) or "none"
            looked = (
                repr(self.reference_key) if self.reference_key is not None else "any of " + ", ".join(REFERENCE_KEYS)
            )
            raise InvalidRequest(
                f"reward {self.reward!r} needs a reference, and the columns passed with the completions "
                f"({columns}) hold no {looked}: set reference_key= to the column that holds the reference answers"
            )
        return found

    def items(
        self, prompts: Sequence[Any], completions: Sequence[Any], kw: Mapping[str, Any]
    ) -> list[ScoreItem | None]:
        """One item per completion, with its position as id; None for a row not to send (no reference)."""
        n = len(completions)
        ref_key = self.reference_column(kw)
        references = kw[ref_key] if ref_key is not None else None
        if len(prompts) != n or (references is not None and len(references) != n):
            n_ref = "no" if references is None else len(references)
            raise InvalidRequest(f"{len(prompts)} prompts, {n} completions, {n_ref} references: need one each")
        columns = {
            key: values
            for key, values in kw.items()
            if key not in TRL_KWARGS
            and key != ref_key
            and isinstance(values, Sequence)
            and not isinstance(values, str)
            and len(values) == n
        }
        out: list[ScoreItem | None] = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            reference = None if references is None or references[i] is None else str(references[i])
            if reference is None and self.needs_reference:
                out.append(None)
                continue
            metadata = {key: values[i] for key, values in columns.items() if _json_safe(values[i])}
            item = {
                "id": str(i),
                **_prompt(prompt, f"prompt {i}"),
                "response": _response(completion, f"completion {i}"),
                "reference": reference,
                "metadata": metadata or None,
            }
            try:
                out.append(ScoreItem.model_validate({key: v for key, v in item.items() if v is not None}))
            except ValidationError as exc:
                raise InvalidRequest(f"row {i} does not make a score item: {problems(exc)}") from None
        return out

    def scores(self, items: Sequence[ScoreItem | None], reply: ScoreResponse | None) -> list[float | None]:
        """One value per row: the item's score, None for a failed item or a row not sent."""
        if reply is not None and reply.reward_id != self.reward_id:
            raise ServerError(
                f"reward {reply.reward!r} is now {reply.reward_id}, not the {self.reward_id} this function was made "
                "for; the server changed its reward mid-run, and the two must not be mixed"
            )
        by_id = {r.id: r for r in reply.results} if reply is not None else {}
        return [None if item is None or by_id[item.id].error is not None else by_id[item.id].score for item in items]

    def named(self, fn: T) -> T:
        """`fn` named after the reward (TRL logs it under that name), carrying `.reward_id`."""
        # `fn` is a plain function, which takes attributes; T (the caller's signature) does not say so
        fn.__name__ = fn.__qualname__ = self.reward  # type: ignore[attr-defined]
        fn.reward_id = self.reward_id  # type: ignore[attr-defined]
        return fn
