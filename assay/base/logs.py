"""Unexpected errors in the servers' logs: one line each, the traceback once per place it came from.

A bug that one kind of request triggers is hit again by every such request: logging its ~11 KB
traceback each time filled 70 MB of log in one run. `quiet_tracebacks()` puts a filter on the
root logger's handlers (what `logging.basicConfig` set up, as the CLIs do) that lets a record's
traceback through the first time its site is seen (the exception's type and the innermost frame
that raised it) and after that reduces the record to its line plus the exception's type and
message. Records at DEBUG keep their tracebacks. No torch here.
"""

from __future__ import annotations

import logging

MAX_SITES = 1024  # distinct sites remembered; past that, every traceback is dropped


class OneTracebackPerSite(logging.Filter):
    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str, int]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.exc_info or record.exc_info[1] is None or record.levelno <= logging.DEBUG:
            return True
        exc = record.exc_info[1]
        site = _site(exc)
        if site not in self.seen and len(self.seen) < MAX_SITES:
            self.seen.add(site)
            return True
        # the same line, with what the traceback's last line would have said
        record.msg = f"{record.getMessage()} [{type(exc).__name__}: {_first_line(exc)}; traceback logged before]"
        record.args, record.exc_info, record.exc_text = None, None, None
        return True


def _site(exc: BaseException) -> tuple[str, str, int]:
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return type(exc).__qualname__, "", 0
    return type(exc).__qualname__, tb.tb_frame.f_code.co_filename, tb.tb_lineno


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return line[:300]


def quiet_tracebacks(logger: logging.Logger | None = None) -> OneTracebackPerSite:
    """Install the filter on `logger`'s handlers (the root's by default), once; returns it."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        for f in handler.filters:
            if isinstance(f, OneTracebackPerSite):
                return f
    one = OneTracebackPerSite()
    for handler in logger.handlers:
        handler.addFilter(one)
    return one
