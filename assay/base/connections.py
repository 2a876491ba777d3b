"""The bounds on clients' HTTP connections and the drain on shutdown: the settings, light to import
(the CLIs take their defaults from here). What enforces them is `assay.base.http_bounds` and `assay.base.serve`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Connections:
    """The bounds on clients' HTTP connections, and the drain on shutdown."""

    max_connections: int = 1024  # open at once; past it a new one gets 503 and is closed
    header_timeout_s: float = 10.0  # connect (or a kept-alive connection's next byte) to the end of the headers
    body_timeout_s: float = 120.0  # end of the headers to the end of the body (uploads included)
    idle_timeout_s: float = 5.0  # keep-alive: a connection idle this long after a response is closed
    drain_timeout_s: float = 30.0  # on SIGTERM: in-flight work may finish within this, then is cut off

    def __post_init__(self) -> None:
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {self.max_connections}")
        for name in ("header_timeout_s", "body_timeout_s", "idle_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        if not self.drain_timeout_s >= 0:
            raise ValueError(f"drain_timeout_s must not be negative, not {self.drain_timeout_s}")
