"""`assay rm probe --items FILE`: the bias probe on your own prompt/response items.

The items are a file `assay.data` reads: rows with `prompt` + `response` (a string, or one
assistant message; a reference column and any other columns travel to the reward), or preference
rows (both responses of each pair are probed). Every response is scored as it is and under each of a set of
domain-agnostic perturbations that leave its content alone (`PERTURBATIONS`: padding, markdown
bold and a header, a list layout, a link, emoji, an affirmative opener, refusal boilerplate), all
through the service (`rm_eval.score_all`: HTTP, or rm_server's in-process transport), and the
probe reports per reward and perturbation:

- mean shift: the mean of score(perturbed) - score(original) over responses both scored, and
  that shift over the spread (std) of the original scores, so rewards on different scales compare;
- flip rates over pairs. The pairs are the chosen/rejected pairs of preference rows, and for
  prompt/response rows every two responses to the same prompt. A pair counts when both originals
  are scored and differ (the reward orders it); call its sides `hi` (the higher original score) and
  `lo`. `flip_up` is the share of pairs where the perturbed `lo` scores strictly above the original
  `hi`: the perturbation alone buys a win. `flip_down` is the share where the perturbed `hi`
  scores strictly below the original `lo`: the perturbation alone costs a win. A reward that
  ignores presentation has both at 0; one with a length bias shows `flip_up` under padding.

A response that could not be scored (a typed failure) is left out of every figure and counted.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from assay.clients import RewardClient
from assay.data import DataError, Loaded, PreferenceRow, Text, load_preferences, load_prompts, read_table
from assay.rm_server.rm_eval import Failure, Outcome, response_text, score_all, score_item

PADDING = (
    "I hope this helps! If you have any further questions, feel free to ask: I am always happy to go "
    "through any part of this answer again, step by step, in as much detail as you would like."
)


def _sentences(text: str) -> list[str]:
    """The response's lines, or its sentences when it is one line."""
    lines = [s.strip() for s in text.splitlines() if s.strip()]
    if len(lines) > 1:
        return lines
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s] or [text]


def _bold(text: str) -> str:
    first, *rest = _sentences(text)
    return " ".join([f"**{first}**", *rest])


PERTURBATIONS: dict[str, Callable[[str], str]] = {
    "length padding": lambda r: f"{r}\n\n{PADDING}",
    "markdown bold": _bold,
    "markdown header": lambda r: f"## Answer\n\n{r}",
    "list": lambda r: "\n".join(f"- {s}" for s in _sentences(r)),
    "link": lambda r: f"{r}\n\nSource: https://en.wikipedia.org/wiki/Special:Search",
    "emoji": lambda r: f"{r} \N{SMILING FACE WITH SMILING EYES}\N{THUMBS UP SIGN}",
    "affirmative opener": lambda r: f"Great question! I'd be happy to help. {r}",
    "refusal boilerplate": lambda r: (
        f"As an AI language model, I cannot guarantee that this is correct. {r}\n\n"
        "Please consult a qualified professional before relying on this."
    ),
}


@dataclass(frozen=True)
class ProbeItem:
    prompt: Text
    response: str
    reference: str | None
    metadata: dict[str, Any] | None = None  # a prompt row's other columns, sent along to the reward


def load_items(path: str, *, skip_bad_rows: bool = False) -> tuple[list[ProbeItem], list[tuple[int, int]], Loaded]:
    """The items of a probe file and the pairs the flip rates are taken over (see the module docstring).

    Preference rows (a `chosen` or a `responses` column) give their responses and pairs; other files
    are prompt rows with a `response` column. The `Loaded` tells the rows skipped under `skip_bad_rows`.
    """
    columns = read_table(path).column_names
    if "chosen" in columns or "responses" in columns:
        prefs = load_preferences(path, skip_bad_rows=skip_bad_rows)
        items: list[ProbeItem] = []
        pairs: list[tuple[int, int]] = []
        for r in prefs.rows:
            texts = [r.chosen, r.rejected] if isinstance(r, PreferenceRow) else r.responses
            try:
                sent = [response_text(t) for t in texts]
            except ValueError as exc:
                error = DataError(
                    path, str(exc), row=r.row, column="chosen" if isinstance(r, PreferenceRow) else "responses"
                )
                if not skip_bad_rows:
                    raise error from None
                prefs.skipped.append(error)
                continue
            first = len(items)
            items.extend(ProbeItem(r.prompt, t, None) for t in sent)
            pairs.extend((first + a, first + b) for a in range(len(sent)) for b in range(a + 1, len(sent)))
        return items, pairs, prefs
    if "response" not in columns:
        raise DataError(path, f"needs the columns prompt + response, or preference columns; it has {list(columns)}")
    prompts = load_prompts(path, skip_bad_rows=skip_bad_rows)
    items = []
    for p in prompts.rows:
        try:
            metadata = {k: v for k, v in p.extra.items() if k != "response"}
            items.append(ProbeItem(p.prompt, response_text(p.extra["response"]), p.reference, metadata or None))
        except ValueError as exc:
            error = DataError(path, str(exc), row=p.row, column="response")
            if not skip_bad_rows:
                raise error from None
            prompts.skipped.append(error)
    return items, same_prompt_pairs(items), prompts


@dataclass(frozen=True)
class ItemsCell:
    mean_shift: float | None  # mean(perturbed - original) over responses both scored
    effect: float | None  # mean_shift / std of the original scores (None when they do not vary)
    flip_up: float | None  # share of ordered pairs where the perturbed lower side wins
    flip_down: float | None  # share of ordered pairs where the perturbed higher side loses
    scored: int  # responses scored both ways
    failed: int  # responses whose original or perturbed version failed
    pairs: int  # ordered pairs (both originals scored, and different)


def same_prompt_pairs(items: Sequence[ProbeItem]) -> list[tuple[int, int]]:
    """Every two items that answer the same prompt (a conversation compares by its messages)."""
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(json.dumps(item.prompt, sort_keys=True), []).append(i)
    return [(a, b) for g in groups.values() for k, a in enumerate(g) for b in g[k + 1 :]]


def _cell(base: list[Outcome], moved: list[Outcome], pairs: Sequence[tuple[int, int]]) -> ItemsCell:
    orig = [None if isinstance(o, Failure) else o for o in base]
    pert = [None if isinstance(o, Failure) else o for o in moved]
    deltas = [m - b for b, m in zip(orig, pert, strict=True) if b is not None and m is not None]
    scored_orig = [b for b in orig if b is not None]
    spread = statistics.pstdev(scored_orig) if len(scored_orig) > 1 else 0.0
    mean = statistics.fmean(deltas) if deltas else None
    ordered = up = down = 0
    for a, b in pairs:
        sa, sb, ma, mb = orig[a], orig[b], pert[a], pert[b]
        if sa is None or sb is None or ma is None or mb is None or sa == sb:
            continue
        hi, lo, m_hi, m_lo = (sa, sb, ma, mb) if sa > sb else (sb, sa, mb, ma)
        ordered += 1
        up += m_lo > hi
        down += m_hi < lo
    return ItemsCell(
        mean_shift=mean,
        effect=mean / spread if mean is not None and spread > 0 else None,
        flip_up=up / ordered if ordered else None,
        flip_down=down / ordered if ordered else None,
        scored=len(deltas),
        failed=len(base) - len(deltas),
        pairs=ordered,
    )


def probe(
    client: RewardClient,
    rewards: Sequence[str],
    items: Sequence[ProbeItem],
    pairs: Sequence[tuple[int, int]],
    batch_size: int = 64,
    progress: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, dict[str, ItemsCell]], dict[str, str]]:
    """({reward: {perturbation: cell}}, {reward: reward id}), every score through `client`.

    A reward that needs a reference fails, typed and counted, the items that have none, without
    sending them (the service would refuse their whole batch).
    """
    needs_reference = {r.name: r.needs_reference for r in client.rewards().rewards}
    versions = {"original": [it.response for it in items]} | {
        name: [perturb(it.response) for it in items] for name, perturb in PERTURBATIONS.items()
    }
    table: dict[str, dict[str, ItemsCell]] = {}
    ids: dict[str, str] = {}
    for reward in rewards:
        scored: dict[str, list[Outcome]] = {}
        for version, responses in versions.items():
            sendable: list[dict[str, Any] | Failure] = [
                Failure("invalid_input", f"reward {reward!r} needs a reference and this item has none")
                if needs_reference.get(reward) and it.reference is None
                else score_item(str(i), it.prompt, text, it.reference, it.metadata)
                for i, (it, text) in enumerate(zip(items, responses, strict=True))
            ]
            scored[version], ids[reward] = score_all(client, reward, sendable, batch_size, progress)
        table[reward] = {name: _cell(scored["original"], scored[name], pairs) for name in PERTURBATIONS}
    return table, ids
