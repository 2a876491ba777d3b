"""Dataset files: prompts, preferences and demonstrations, read with Hugging Face `datasets`.

A file is what people already have: JSONL, JSON, Parquet or CSV, or a folder written by
`Dataset.save_to_disk`, in TRL's standard (strings) or conversational (lists of `{"role", "content"}`
messages) formats. Three kinds, one loader each:

- prompts (GRPO, PPO, iterative DPO, search): `prompt`; a reference under `reference_key`, or found
  under the first of REFERENCE_KEYS present; every other column travels with the row (`extra`).
- preferences (reward-model training, DPO, `rm eval`): `prompt` + `chosen` + `rejected`, or K-wise
  `responses` + `scores` (higher is better) or `ranking` (indices into `responses`, best first); an
  optional `subset`. Without a `prompt` column the prompt is implicit (TRL): the messages `chosen` and
  `rejected` share are split off as the prompt.
- demonstrations (SFT): `prompt` + `completion`, or `messages` (the last turn, the assistant's, is the
  completion).

Nothing is dropped silently: a malformed row raises a DataError naming the file, the row (counted
from 0, as `datasets` indexes rows) and the column; with `skip_bad_rows` the row is left out and its
error kept in `Loaded.skipped` for the caller to count and print.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    import datasets

Message = dict[str, str]  # {"role": ..., "content": ...}
Text = str | list[Message]  # a prompt or a response: plain text, or a conversation

REFERENCE_KEYS = ("reference", "answer", "solution", "ground_truth")
ROLES = ("system", "user", "assistant", "tool")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """What is wrong with a data file: the file, and where known the row and the column."""

    def __init__(self, path: str | Path, message: str, *, row: int | None = None, column: str | None = None) -> None:
        self.path, self.row, self.column, self.message = str(path), row, column, message
        where = "".join(
            [f" row {row}" if row is not None else "", f", column {column!r}" if column is not None else ""]
        )
        super().__init__(f"{self.path}{where}: {message}")


@dataclass(frozen=True)
class PromptRow:
    prompt: Text
    reference: str | None
    extra: dict[str, Any]  # the row's other columns, sent along to the reward
    row: int


@dataclass(frozen=True)
class PreferenceRow:
    prompt: Text  # "" when a row of plain text has no prompt: the whole text is the response
    chosen: Text
    rejected: Text
    subset: str | None
    row: int


@dataclass(frozen=True)
class RankedRow:
    prompt: Text
    responses: list[Text]
    scores: list[float]  # one per response, higher is better
    subset: str | None
    row: int


@dataclass(frozen=True)
class DemoRow:
    prompt: Text
    completion: Text
    row: int


R = TypeVar("R")


@dataclass
class Loaded(Generic[R]):
    path: str
    rows: list[R]
    skipped: list[DataError] = field(default_factory=list)  # rows left out under skip_bad_rows


# --- reading a file ---------------------------------------------------------------------------


def read_table(path: str | Path) -> datasets.Dataset:
    """The file (or `save_to_disk` folder) as one `datasets.Dataset`."""
    import datasets  # heavy (pyarrow, pandas): only when a file is read

    p = Path(path)
    if not p.exists():
        raise DataError(p, "no such file or folder")
    # `datasets` draws a "Generating train split" bar per file on stderr; ours say what is happening
    quiet_before = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        if p.is_dir():
            loaded = datasets.load_from_disk(str(p))
            if isinstance(loaded, datasets.DatasetDict):
                if len(loaded) != 1:
                    raise DataError(p, f"holds the splits {sorted(loaded)}: point at one split's folder")
                loaded = next(iter(loaded.values()))
            return loaded
        builder = FORMATS.get(p.suffix.lower())
        if builder is None:
            raise DataError(
                p, f"unknown format {p.suffix!r}: use one of {', '.join(FORMATS)}, or a save_to_disk folder"
            )
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    except DataError:
        raise
    except Exception as e:  # datasets/pyarrow parse errors come as many types; all mean "cannot read it"
        raise DataError(p, f"cannot be read as a dataset: {type(e).__name__}: {e}") from e
    finally:
        if not quiet_before:
            datasets.enable_progress_bars()
    assert isinstance(ds, datasets.Dataset), "one split asked for"
    return ds


def _rows(
    path: str | Path,
    table: datasets.Dataset,
    required: Sequence[Sequence[str]],
    parse: Callable[[dict[str, Any], int, list[str]], R],
    skip_bad_rows: bool,
) -> Loaded[R]:
    """Parse every row; `required` lists alternatives of column sets, one of which must be present."""
    columns = list(table.column_names)
    if not any(all(c in columns for c in needed) for needed in required):
        wanted = " or ".join(" + ".join(needed) for needed in required)
        raise DataError(path, f"needs the columns {wanted}; it has {columns}")
    loaded: Loaded[R] = Loaded(str(path), [])
    for i, raw in enumerate(table):
        try:
            loaded.rows.append(parse(dict(raw), i, columns))
        except _BadCell as e:
            error = DataError(path, e.message, row=i, column=e.column)
            if not skip_bad_rows:
                raise error from None
            loaded.skipped.append(error)
    if not loaded.rows:
        raise DataError(path, "has no usable rows" + (f" ({len(loaded.skipped)} skipped)" if loaded.skipped else ""))
    return loaded


class _BadCell(Exception):
    def __init__(self, column: str, message: str) -> None:
        self.column, self.message = column, message


# --- cells --------------------------------------------------------------------------------------


def _text(value: Any, column: str) -> Text:
    """A string, or a non-empty list of {role, content} messages with string content."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        messages = []
        for j, m in enumerate(value):
            if not isinstance(m, Mapping) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise _BadCell(
                    column, f"message {j} is not a {{role, content}} message with role in {ROLES} and text content"
                )
            messages.append({"role": str(m["role"]), "content": str(m["content"])})
        return messages
    got = "null" if value is None else "an empty list" if value == [] else type(value).__name__
    raise _BadCell(column, f"expected a string or a list of chat messages, got {got}")


def _reference(value: Any, column: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _BadCell(column, f"expected a string or a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise _BadCell(column, "is not a finite number")
    return str(value)


def _subset(row: dict[str, Any]) -> str | None:
    value = row.get("subset")
    if value is None or isinstance(value, str):
        return value
    raise _BadCell("subset", f"expected a string, got {type(value).__name__}")


def _split_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """TRL's implicit prompt: the leading messages (or text) both responses share."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(chosen, str) and isinstance(rejected, str):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1  # as TRL's extract_prompt: the space before the answer opens the response
        return chosen[:n], chosen[n:], rejected[n:]
    raise _BadCell("rejected", "`chosen` and `rejected` must both be strings or both be message lists")


# --- the three kinds ----------------------------------------------------------------------------


def load_prompts(
    path: str | Path, *, reference_key: str | None = None, prompt_key: str = "prompt", skip_bad_rows: bool = False
) -> Loaded[PromptRow]:
    """Prompts, with a reference (None where a row has none) and the other columns as `extra`."""
    table = read_table(path)
    columns = list(table.column_names)
    if reference_key is not None and reference_key not in columns:
        raise DataError(path, f"has no reference column {reference_key!r}; it has {columns}")
    ref_key = reference_key or next((k for k in REFERENCE_KEYS if k in columns), None)

    def parse(row: dict[str, Any], i: int, _: list[str]) -> PromptRow:
        extra = {k: v for k, v in row.items() if k not in (prompt_key, ref_key)}
        reference = _reference(row[ref_key], ref_key) if ref_key else None
        return PromptRow(_text(row[prompt_key], prompt_key), reference, extra, i)

    return _rows(path, table, [[prompt_key]], parse, skip_bad_rows)


def load_preferences(path: str | Path, *, skip_bad_rows: bool = False) -> Loaded[PreferenceRow | RankedRow]:
    """Pairs (`chosen`/`rejected`) and K-wise rows (`responses` + `scores` or `ranking`)."""

    def parse(row: dict[str, Any], i: int, columns: list[str]) -> PreferenceRow | RankedRow:
        subset = _subset(row)
        if row.get("responses") is not None or "chosen" not in columns:
            return _ranked(row, i, subset)
        chosen, rejected = _text(row["chosen"], "chosen"), _text(row["rejected"], "rejected")
        if row.get("prompt") is not None:
            return PreferenceRow(_text(row["prompt"], "prompt"), chosen, rejected, subset, i)
        prompt, chosen, rejected = _split_prompt(chosen, rejected)
        return PreferenceRow(prompt, chosen, rejected, subset, i)

    return _rows(path, read_table(path), [["chosen", "rejected"], ["prompt", "responses"]], parse, skip_bad_rows)


def _ranked(row: dict[str, Any], i: int, subset: str | None) -> RankedRow:
    prompt = _text(row.get("prompt"), "prompt")
    raw = row.get("responses")
    if not isinstance(raw, list) or len(raw) < 2:
        raise _BadCell("responses", "expected a list of at least two responses")
    responses = [_text(r, "responses") for r in raw]
    k = len(responses)
    if row.get("scores") is not None:
        scores = row["scores"]
        if not isinstance(scores, list) or len(scores) != k or not all(_is_number(s) for s in scores):
            raise _BadCell("scores", f"expected {k} finite numbers, one per response")
        scores = [float(s) for s in scores]
    elif row.get("ranking") is not None:
        ranking = row["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise _BadCell("ranking", f"expected the indices 0..{k - 1} of `responses`, best first, each once")
        scores = [0.0] * k
        for place, index in enumerate(ranking):
            scores[index] = float(k - place)
    else:
        raise _BadCell("scores", "a row with `responses` needs `scores` or `ranking`")
    if len(set(scores)) < 2:
        raise _BadCell("scores", "all responses score the same: the row prefers nothing")
    return RankedRow(prompt, responses, scores, subset, i)


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def load_demonstrations(path: str | Path, *, skip_bad_rows: bool = False) -> Loaded[DemoRow]:
    """`prompt` + `completion`, or `messages` ending with the assistant's turn."""

    def parse(row: dict[str, Any], i: int, columns: list[str]) -> DemoRow:
        if "messages" in columns and row.get("messages") is not None:
            messages = _text(row["messages"], "messages")
            if isinstance(messages, str) or len(messages) < 2 or messages[-1]["role"] != "assistant":
                raise _BadCell("messages", "expected a conversation ending with an assistant message")
            return DemoRow(messages[:-1], messages[-1:], i)
        return DemoRow(_text(row.get("prompt"), "prompt"), _text(row.get("completion"), "completion"), i)

    return _rows(path, read_table(path), [["prompt", "completion"], ["messages"]], parse, skip_bad_rows)


def split(rows: Sequence[R], eval_fraction: float, seed: int) -> tuple[list[R], list[R]]:
    """(train, eval): a seeded random `eval_fraction` of the rows held out, order kept within each."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be between 0 and 1, not {eval_fraction}")
    n_eval = max(1, round(len(rows) * eval_fraction))
    if n_eval >= len(rows):
        raise ValueError(f"{len(rows)} rows cannot be split {1 - eval_fraction:.0%}/{eval_fraction:.0%}")
    held = set(random.Random(seed).sample(range(len(rows)), n_eval))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]
