"""Dataset rows (`assay.data`) as the trainer's examples, in the text the model reads.

A row's prompt and responses are plain text or conversations (TRL's standard and conversational
formats). Plain text is used as it is; a conversation goes through the model's own chat template
(`assay.chat`), and the response is what the template adds after the prompt it renders with a
generation prompt, so prompt text + response text is the whole exchange the template writes:

- demonstrations -> (prompt, completion) for `trainer.sft`, and preference rows -> `Pair`s for
  `trainer.dpo`: both close the completion with the tokenizer's eos (`sft.encode_example`), so a
  rendered completion is cut where the template writes that token (`<|im_end|>` in ChatML) and the
  model learns to stop exactly there;
- preference rows -> `RankedGroup`s for `trainer.reward_model`: a (prompt, chosen, rejected) row is
  a group of two; a K-wise row (`responses` + `scores`) is its best-scored response against every
  lower-scored one (the listwise loss reads up to `k` of them, Bradley-Terry one at a time).

A row whose template does not write the prompt as the start of the exchange (a template that
rewrites earlier turns) is refused with its file and row, never trained on in a shifted form.
A K-wise row's pairs are its best response against each lower-scored one: a ranking among the
lower ones is not used.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from assay.chat import split_exchange
from assay.data import DemoRow, PreferenceRow, RankedRow, Text
from assay.trainer.dpo import Pair
from assay.trainer.reward_model import RankedGroup

PrefRow = PreferenceRow | RankedRow


def is_chat(rows: Sequence[DemoRow | PrefRow]) -> bool:
    """Whether any row holds a conversation (its text then comes from the chat template)."""
    return any(not isinstance(text, str) for row in rows for text in _texts(row))


def exchange(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text, where: str) -> tuple[str, str]:
    """(prompt text, response text) as the model reads them (`assay.chat.split_exchange`); `where`
    ("data.jsonl row 3") names the row in the error of a template that cannot be cut there."""
    try:
        return split_exchange(tokenizer, prompt, response)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


def completion(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text, where: str) -> tuple[str, str]:
    """`exchange`, with a rendered response cut before the template's eos: the trainer appends eos itself."""
    head, tail = exchange(tokenizer, prompt, response, where)
    eos = tokenizer.eos_token
    if not (isinstance(prompt, str) and isinstance(response, str)) and eos and eos in tail:
        tail = tail[: tail.rindex(eos)]
    return head, tail


def demonstrations(tokenizer: PreTrainedTokenizerBase, rows: Sequence[DemoRow], path: str) -> list[tuple[str, str]]:
    """(prompt, completion) texts for SFT."""
    return [completion(tokenizer, r.prompt, r.completion, f"{path} row {r.row}") for r in rows]


def ranked_groups(tokenizer: PreTrainedTokenizerBase, rows: Sequence[PrefRow], path: str) -> list[RankedGroup]:
    """One `RankedGroup` per row."""
    groups = []
    for r in rows:
        where = f"{path} row {r.row}"
        responses, best, worse = _ranking(r)
        texts = [exchange(tokenizer, r.prompt, resp, where) for resp in responses]
        # every response follows the same rendered prompt: the group keeps it once
        groups.append(RankedGroup(texts[0][0], [t for _, t in texts], best=best, worse=worse))
    return groups


def pairs(tokenizer: PreTrainedTokenizerBase, rows: Sequence[PrefRow], path: str) -> list[Pair]:
    """DPO pairs: a pair row as it is; a K-wise row as its best response against each lower-scored one."""
    out: list[Pair] = []
    for r in rows:
        where = f"{path} row {r.row}"
        responses, best, worse = _ranking(r)
        head, good = completion(tokenizer, r.prompt, responses[best], where)
        out.extend(Pair(head, good, completion(tokenizer, r.prompt, responses[i], where)[1]) for i in worse)
    return out


def _ranking(row: PrefRow) -> tuple[list[Text], int, list[int]]:
    """(responses, the best one, the lower-scored ones); the first of equal best scores is the best.
    (`assay.data` refuses a K-wise row whose responses all score the same.)"""
    if isinstance(row, PreferenceRow):
        return [row.chosen, row.rejected], 0, [1]
    best = max(range(len(row.scores)), key=row.scores.__getitem__)
    return row.responses, best, [i for i, s in enumerate(row.scores) if s < row.scores[best]]


def _texts(row: DemoRow | PrefRow) -> list[Text]:
    if isinstance(row, DemoRow):
        return [row.prompt, row.completion]
    if isinstance(row, PreferenceRow):
        return [row.prompt, row.chosen, row.rejected]
    return [row.prompt, *row.responses]
