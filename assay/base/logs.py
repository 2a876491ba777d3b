"""The servers' log records: their format (text or JSON lines), the request each belongs to, and
unexpected errors one line each, the traceback once per place it came from.

`configure(level, format)` sets up the root logger as the server commands (and the reward model
workers) use it: one stderr handler whose records are text (`time logger LEVEL message`) or, with
`json`, one JSON object per line with the standard fields (`time`, `level`, `logger`, `message`,
`process`, `thread`), the traceback as `exc_info`, and any `extra` fields (an access line's). Every
record logged while a request is served carries that request's id (`request_id`, from the context
`assay.base.access` sets per HTTP request and gRPC call), so an error logged deep in the serving
layer names the request that caused it.

A bug that one kind of request triggers is hit again by every such request: logging its ~11 KB
traceback each time filled 70 MB of log in one run. `quiet_tracebacks()` puts a filter on the
root logger's handlers (what `logging.basicConfig` set up, as the CLIs do) that lets a record's
traceback through the first time its site is seen (the exception's type and the innermost frame
that raised it) and after that reduces the record to its line plus the exception's type and
message. Records at DEBUG keep their tracebacks. No torch here.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime

MAX_SITES = 1024  # distinct sites remembered; past that, every traceback is dropped
TEXT_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"
ACCESS_LOGGER = "assay.access"  # one record per request (assay.base.access); the servers' --no-access-log silences it
# the attributes every LogRecord has: what is not among them came in `extra` and goes into a JSON line as is
# (and uvicorn's `color_message`, its message with terminal colours)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
    "request_id",
}


@dataclass
class RequestContext:
    """The request being served: its id, and what the serving layer notes for its access line."""

    request_id: str
    fields: dict[str, str] = field(default_factory=dict)  # {"reward": "orm"}, {"model": "policy"}


# set per HTTP request and gRPC call (`assay.base.access`); tasks a handler starts copy it, the same object
current_request: ContextVar[RequestContext | None] = ContextVar("assay_request", default=None)


def note(**fields: str) -> None:
    """Add fields to the current request's access line (nothing outside a request)."""
    request = current_request.get()
    if request is not None:
        request.fields.update(fields)


class RequestIdFilter(logging.Filter):
    """Gives every record `request_id`: the id of the request being served, or None."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            request = current_request.get()
            record.request_id = request.request_id if request is not None else None
        return True


class TextFormatter(logging.Formatter):
    """`time logger LEVEL message`, then ` request_id=...` inside a request; `tag` marks another process."""

    def __init__(self, tag: str | None = None) -> None:
        super().__init__(TEXT_FORMAT if tag is None else TEXT_FORMAT.replace("%(message)s", f"[{tag}] %(message)s"))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        request_id = getattr(record, "request_id", None)
        if request_id is None:
            return text
        line, newline, rest = text.partition("\n")  # after the message's first line, before a traceback
        return f"{line} request_id={request_id}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: the standard fields, the request id, `extra` fields, the traceback."""

    def __init__(self, tag: str | None = None) -> None:
        super().__init__()
        self.tag = tag

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
            "thread": record.threadName,
        }
        if self.tag is not None:
            out["role"] = self.tag
        request_id = getattr(record, "request_id", None)  # RequestIdFilter's
        if request_id is not None:
            out["request_id"] = request_id
        out.update((k, v) for k, v in vars(record).items() if k not in _STANDARD and k not in out)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def configure(level: str | int, log_format: str = "text", tag: str | None = None) -> None:
    """The root logger at `level`, its records to stderr as `text` or `json` lines, each with its request id
    (`tag`: the process's role, for a worker process). Does nothing when the root has a handler already."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter(tag) if log_format == "json" else TextFormatter(tag))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, handlers=[handler])


def log_format() -> str:
    """`json` when the root logger writes JSON lines (what a worker process should write too), else `text`."""
    formats = {type(h.formatter) for h in logging.getLogger().handlers}
    return "json" if JsonFormatter in formats else "text"


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
