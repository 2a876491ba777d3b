"""`assay rm eval`: a reward measured on preference data the way RewardBench reports a reward model.

Every response is scored THROUGH THE SERVICE (a `RewardClient` over HTTP, or over rm_server's
in-process transport, which runs the same serving layer on the same spec), so the figure is what
the service serves, reward id included. The report:

- `accuracy`: the share of scored pairs whose chosen response scores strictly above the rejected
  one. A tie counts as wrong, as RewardBench counts it; `ties` says how many there were, and
  `accuracy_ties_half` counts them half (the convention of `assay eval`'s ORM figure, so the two
  can be compared on the same pairs);
- `mean_margin`: the mean of score(chosen) - score(rejected) over scored pairs;
- the same per `subset` (rows without one count in the overall figures only);
- failures: a response the service could not score (a typed item error, or a request it refused
  for that item alone, such as one over the model's `max_tokens`) leaves its pairs out of every
  figure; they are counted in `failed_pairs` and by error type in `failures`, never scored as wrong.

K-wise rows (`responses` + `scores`) count as pairs: every best-scored response against every
response scored strictly lower (a row of K distinct scores gives K - 1 pairs). Each response of a
row is scored once, however many pairs it is in. A prompt given as messages travels as the item's
`messages` (the reward renders it, with its own chat template); a response given as messages must
be one assistant turn, and is sent as its text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from assay.clients import RewardClient
from assay.clients.errors import InvalidRequest, ServerError
from assay.data import DataError, Loaded, PreferenceRow, RankedRow, Text


@dataclass(frozen=True)
class Failure:
    """Why one response has no score: the service's error type (or the request it refused) and its message."""

    type: str
    message: str


Outcome = float | Failure


@dataclass(frozen=True)
class Pair:
    row: int
    subset: str | None
    chosen: int  # index into the scored items
    rejected: int


def response_text(response: Any) -> str:
    """The text the service scores: a string as is, or the content of a single assistant message."""
    if isinstance(response, str):
        return response
    if isinstance(response, list) and len(response) == 1 and isinstance(response[0], Mapping):
        message = response[0]
        if message.get("role") == "assistant" and isinstance(message.get("content"), str):
            return message["content"]
    what = f"{len(response)} messages" if isinstance(response, list) else type(response).__name__
    raise ValueError(f"expected a string or one assistant message (the service scores one turn), got {what}")


def score_item(
    item_id: str, prompt: Text, response: Text, reference: str | None = None, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A `ScoreItem` as a dict: a string prompt as `prompt`, a conversation as `messages`."""
    item: dict[str, Any] = {"id": item_id, "response": response_text(response)}
    item["prompt" if isinstance(prompt, str) else "messages"] = prompt
    if reference is not None:
        item["reference"] = reference
    if metadata:
        item["metadata"] = metadata
    return item


def plan(rows: Sequence[PreferenceRow | RankedRow]) -> tuple[list[dict[str, Any] | Failure], list[Pair]]:
    """The items to score (or the reason one cannot be sent) and the pairs over them, row by row."""
    items: list[dict[str, Any] | Failure] = []
    pairs: list[Pair] = []
    for r in rows:
        responses = [r.chosen, r.rejected] if isinstance(r, PreferenceRow) else list(r.responses)
        first = len(items)
        for k, response in enumerate(responses):
            try:
                items.append(score_item(f"{r.row}.{k}", r.prompt, response))
            except ValueError as exc:
                items.append(Failure("invalid_input", f"row {r.row}, response {k}: {exc}"))
        if isinstance(r, PreferenceRow):
            pairs.append(Pair(r.row, r.subset, first, first + 1))
            continue
        best = max(r.scores)
        for i, si in enumerate(r.scores):
            if si != best:
                continue
            pairs.extend(Pair(r.row, r.subset, first + i, first + j) for j, sj in enumerate(r.scores) if sj < best)
    return items, pairs


def score_all(
    client: RewardClient,
    reward: str,
    items: Sequence[dict[str, Any] | Failure],
    batch_size: int,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[list[Outcome], str]:
    """Every item's score or failure, and the reward id every answer carried.

    Items go in batches of `batch_size`. A batch the service refuses as a whole (400: an item over
    the model's `max_tokens`, a missing reference) is sent again one item at a time, so that the
    refusal lands on the item that caused it and the rest are scored. Any other failed call
    (unreachable, unknown reward, wrong key) ends the evaluation: it says nothing about one item.
    A reply for another reward id raises `ServerError`: the served reward changed mid-evaluation.
    """
    outcomes: list[Outcome | None] = [x if isinstance(x, Failure) else None for x in items]
    sendable = {i: x for i, x in enumerate(items) if not isinstance(x, Failure)}
    todo = list(sendable)
    reward_id: str | None = None

    def send(batch: list[int]) -> None:
        nonlocal reward_id
        reply = client.score(reward, [sendable[i] for i in batch])
        if reward_id is not None and reply.reward_id != reward_id:
            raise ServerError(f"reward {reward!r} changed from {reward_id} to {reply.reward_id} during the evaluation")
        reward_id = reply.reward_id
        for i, result in zip(batch, reply.results, strict=True):
            if result.error is not None:
                outcomes[i] = Failure(result.error.type.value, result.error.message)
            else:
                assert result.score is not None  # the protocol: null exactly when error is set
                outcomes[i] = result.score

    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        try:
            send(batch)
        except InvalidRequest:
            for i in batch:
                try:
                    send([i])
                except InvalidRequest as exc:
                    outcomes[i] = Failure(str(exc.type.value if exc.type else "invalid_request"), exc.message)
        progress(len(batch))
    if reward_id is None:  # nothing was scored: ask for the id all the same, the report names it
        reward_id = client.reward_id(reward)
    return [o for o in outcomes if o is not None], reward_id


@dataclass
class Tally:
    """Pairwise figures over one set of pairs (all of them, or one subset)."""

    pairs: int = 0  # scored pairs
    correct: int = 0  # chosen strictly above rejected
    ties: int = 0
    margin_sum: float = 0.0
    failed_pairs: int = 0  # left out: a side has no score

    def add(self, chosen: Outcome, rejected: Outcome) -> None:
        if isinstance(chosen, Failure) or isinstance(rejected, Failure):
            self.failed_pairs += 1
            return
        self.pairs += 1
        self.correct += chosen > rejected
        self.ties += chosen == rejected
        self.margin_sum += chosen - rejected

    def figures(self) -> dict[str, Any]:
        n = self.pairs
        return {
            "pairs": n,
            "accuracy": self.correct / n if n else None,
            "ties": self.ties,
            "accuracy_ties_half": (self.correct + 0.5 * self.ties) / n if n else None,
            "mean_margin": self.margin_sum / n if n else None,
            "failed_pairs": self.failed_pairs,
        }


@dataclass
class Report:
    data: str
    reward: str
    reward_id: str
    rows: int
    overall: Tally
    subsets: dict[str, Tally]
    failures: dict[str, int]  # failed responses by error type
    failure_examples: list[str]
    skipped_rows: list[DataError] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "reward": self.reward,
            "reward_id": self.reward_id,
            "rows": self.rows,
            **self.overall.figures(),
            "subsets": {name: t.figures() for name, t in sorted(self.subsets.items())},
            "failures": self.failures,
            "failure_examples": self.failure_examples,
            "skipped_rows": len(self.skipped_rows),
            "skipped_row_errors": [str(e) for e in self.skipped_rows],
        }


def _where(item: dict[str, Any] | Failure) -> str:
    """`row 3, response 1: ` for a sent item (its id is `row.k`); a local failure names it itself."""
    if isinstance(item, Failure):
        return ""
    row, k = item["id"].split(".")
    return f"row {row}, response {k}: "


def evaluate(
    client: RewardClient,
    reward: str,
    loaded: Loaded[PreferenceRow | RankedRow],
    batch_size: int = 64,
    progress: Callable[[int], None] = lambda n: None,
    total: Callable[[int], None] = lambda n: None,
) -> Report:
    """Score every response of `loaded` with `reward` through `client`, and tally the pairs.

    `total(n)` is told how many items will be scored before the first is sent; `progress(k)`
    after each batch (a progress bar).
    """
    items, pairs = plan(loaded.rows)
    total(sum(not isinstance(x, Failure) for x in items))
    outcomes, reward_id = score_all(client, reward, items, batch_size, progress)
    overall, subsets = Tally(), dict[str, Tally]()
    for p in pairs:
        overall.add(outcomes[p.chosen], outcomes[p.rejected])
        if p.subset is not None:
            subsets.setdefault(p.subset, Tally()).add(outcomes[p.chosen], outcomes[p.rejected])
    failed = [(x, o) for x, o in zip(items, outcomes, strict=True) if isinstance(o, Failure)]
    counts: dict[str, int] = {}
    for _, f in failed:
        counts[f.type] = counts.get(f.type, 0) + 1
    return Report(
        data=loaded.path,
        reward=reward,
        reward_id=reward_id,
        rows=len(loaded.rows),
        overall=overall,
        subsets=subsets,
        failures=counts,
        failure_examples=[f"{_where(x)}{f.type}: {f.message}" for x, f in failed[:5]],
        skipped_rows=list(loaded.skipped),
    )
