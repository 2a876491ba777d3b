"""Answer extraction: a response's final answer, wherever one is compared or voted on.

One small config, `Extract(how, pattern)`, and one function, `extract(text, how)`:

- `hashes` (the default): the number after `####` at the end of the response, the arithmetic
  world's and GSM8K's format: `"23+45=68 68-17=51 #### 51"` -> `"51"`;
- `boxed`: the content of the last complete `\\boxed{...}` (braces balanced, so
  `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`), the MATH and most reasoning models' format;
- `last_number`: the last number in the text (`"she pays $1,234.50."` -> `"1234.5"`);
- `regex`: group 1 of the last match of the user's `pattern` (the last, since a response may
  restate intermediate results before its answer).

What is extracted is normalised, so that answers a reader counts as one answer compare equal:
a number loses its thousands separators, a `+` sign, leading zeros and trailing decimal zeros
(`1,234` -> `1234`, `2.50` -> `2.5`, `-07` -> `-7`, `-0` -> `0`); any other answer has its outer
whitespace stripped and inner runs of whitespace collapsed. `rule.math_equal` then compares
answers under math-verify (where `0.5` equals `\\frac{1}{2}`); a vote (majority, weighted
best-of-N) compares the normalised strings.

The search strategies, the reward service's rules and the policy server's `/v1/search` all take
an `Extract`, so one spelling (`{"how": "boxed"}`) means the same everywhere. A bad pattern is
refused when the config is made, with the reason. Imports nothing of ours; standard library only.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Literal, get_args

How = Literal["hashes", "boxed", "last_number", "regex"]
HOWS: tuple[str, ...] = get_args(How)

# A number as people write one: digits (or thousands groups of three), an optional fraction, after
# an optional sign; not inside a word or after a digit (in "68-17" the `-` is an operator, not a sign).
_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?" + _DIGITS)
# `-` only after `####`, as before: the embedded policy writes `####+77` as a slip (8 of 2,048
# samples at T=1), and counting it as 77 would change the arithmetic results.
_HASHES = re.compile(r"####\s*(-?" + _DIGITS + r")\s*$")
_BOXED = re.compile(r"\\boxed\s*\{")


@functools.lru_cache(maxsize=256)
def pattern(text: str, what: str = "answer pattern") -> re.Pattern[str]:
    """`text` compiled, with a capturing group for the answer; ValueError saying what is wrong otherwise."""
    try:
        compiled = re.compile(text)
    except re.error as exc:
        raise ValueError(f"{what} {text!r} is not a valid regular expression: {exc}") from None
    if compiled.groups < 1:
        raise ValueError(f"{what} {text!r} needs a capturing group: group 1 is the answer")
    return compiled


def last_group(compiled: re.Pattern[str], text: str) -> str | None:
    """Group 1 of the last match of `compiled` in `text`, as written (not normalised); None when none."""
    last = None
    for match in compiled.finditer(text):
        last = match
    return None if last is None else last.group(1)


@dataclass(frozen=True)
class Extract:
    """How to find the final answer in a response: `how` one of hashes, boxed, last_number,
    regex; `pattern` (regex only) a regular expression whose group 1 is the answer."""

    how: How = "hashes"
    pattern: str | None = None

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"answer extraction `how` must be one of {', '.join(HOWS)}; got {self.how!r}")
        if self.how == "regex":
            if self.pattern is None:
                raise ValueError("answer extraction `regex` needs a `pattern` whose group 1 is the answer")
            pattern(self.pattern)  # refused now, not at the first response
        elif self.pattern is not None:
            raise ValueError(f"`pattern` is for `how: regex` only; `how: {self.how}` takes none")


HASHES = Extract()  # the default everywhere: `#### n`


def extract(text: str, how: Extract = HASHES) -> str | None:
    """The normalised final answer of `text`, or None when it has none.

    >>> extract("23+45=68 68-17=51 #### 51")
    '51'
    >>> extract(r"so the answer is \\boxed{2.50}", Extract("boxed"))
    '2.5'
    """
    if how.how == "hashes":
        found = last_group(_HASHES, text.strip())
    elif how.how == "boxed":
        found = last_boxed(text)
    elif how.how == "last_number":
        numbers = _NUMBER_RE.findall(text)
        found = numbers[-1] if numbers else None
    else:
        assert how.pattern is not None  # __post_init__
        found = last_group(pattern(how.pattern), text)
    return None if found is None else normalize(found)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` whose braces close; None when there is none."""
    found = None
    for start in _BOXED.finditer(text):
        depth, i = 1, start.end()
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth == 0:
            found = text[start.end() : i - 1]
    return found


def normalize(answer: str) -> str:
    """One spelling per answer: numbers canonical (`+1,234.50` -> `1234.5`), other text with
    whitespace stripped and collapsed. References go through it too, so `2.50` matches `2.5`."""
    text = " ".join(answer.split())
    if not _NUMBER_RE.fullmatch(text):
        return text
    sign = "-" if text.startswith("-") else ""
    whole, _, frac = text.lstrip("+-").replace(",", "").partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    if whole == "0" and not frac:
        sign = ""  # -0 is 0
    return f"{sign}{whole}.{frac}" if frac else f"{sign}{whole}"
