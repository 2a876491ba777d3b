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
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from assay.chat import render_exchange, render_prompt
from assay.data import DemoRow, PreferenceRow, RankedRow, Text
from assay.trainer.dpo import Pair
from assay.trainer.reward_model import RankedGroup

PrefRow = PreferenceRow | RankedRow


def is_chat(rows: Sequence[DemoRow | PrefRow]) -> bool:
    """Whether any row holds a conversation (its text then comes from the chat template)."""
    return any(not isinstance(text, str) for row in rows for text in _texts(row))


def exchange(tokenizer: PreTrainedTokenizerBase, prompt: Text, response: Text, where: str) -> tuple[str, str]:
    """(prompt text, response text) as the model reads them; together, the whole exchange.

    `where` names the row ("data.jsonl row 3") in the error of a template that does not extend the prompt."""
    if isinstance(prompt, str) and isinstance(response, str):
        return prompt, response
    head = render_prompt(tokenizer, prompt)
    whole = render_exchange(tokenizer, prompt, response)
    if not whole.startswith(head):
        raise ValueError(
            f"{where}: the chat template does not write the prompt as the start of the exchange, "
            "so the response's tokens cannot be told apart from the prompt's"
        )
    return head, whole[len(head) :]


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
        responses, best, worse = _ranking(r, where)
        texts = [exchange(tokenizer, r.prompt, resp, where) for resp in responses]
        # every response follows the same rendered prompt: the group keeps it once
        groups.append(RankedGroup(texts[0][0], [t for _, t in texts], best=best, worse=worse))
    return groups


def pairs(tokenizer: PreTrainedTokenizerBase, rows: Sequence[PrefRow], path: str) -> list[Pair]:
    """DPO pairs: a pair row as it is; a K-wise row as its best response against each lower-scored one."""
    out = []
    for r in rows:
        where = f"{path} row {r.row}"
        responses, best, worse = _ranking(r, where)
        head, good = completion(tokenizer, r.prompt, responses[best], where)
        out.extend(Pair(head, good, completion(tokenizer, r.prompt, responses[i], where)[1]) for i in worse)
    return out


def _ranking(row: PrefRow, where: str) -> tuple[list[Text], int, list[int]]:
    """(responses, the best one, the lower-scored ones); the first of equal best scores is the best.

    A K-wise row whose responses all score the same prefers none, and is refused with its row."""
    if isinstance(row, PreferenceRow):
        return [row.chosen, row.rejected], 0, [1]
    best = max(range(len(row.scores)), key=row.scores.__getitem__)
    worse = [i for i, s in enumerate(row.scores) if s < row.scores[best]]
    if not worse:
        raise ValueError(f"{where}: every response has the same score, so none is preferred")
    return row.responses, best, worse


def _texts(row: DemoRow | PrefRow) -> list[Text]:
    if isinstance(row, DemoRow):
        return [row.prompt, row.completion]
    if isinstance(row, PreferenceRow):
        return [row.prompt, row.chosen, row.rejected]
    return [row.prompt, *row.responses]
