"""Several replicas of one service behind one client: their addresses, which one to ask, which to avoid.

Addresses. Every client that takes a URL (or a gRPC target) takes several: a sequence, or one
string of comma-separated ones ("http://10.0.0.5:8000,http://10.0.0.6:8000"), so that one
command-line option (`--rm-url`, `--policy-url`) names them all. A *service address* names every
replica at once: `dns+http://NAME:PORT[/path]` (or `dns+https://`) for HTTP, and gRPC's own spelling of a
DNS target, `dns:///NAME:PORT`, for gRPC. NAME is resolved to each of its addresses (a Kubernetes
headless Service answers one per ready pod), one replica each, and resolved again every
`RESOLVE_EVERY_S` seconds (the cluster DNS's TTL), and sooner when every replica is failing.
Each such replica is reached at its IP but asked for NAME: HTTP's Host header and TLS server name,
gRPC's authority and certificate name, so servers that check Host (`--allowed-host NAME`) and
certificates issued for NAME both hold.

Spreading. A call goes to the replica with the fewest calls of this client in flight, ties taken in
turn (so sequential calls go round robin). Least-outstanding rather than plain round robin: a
replica that answers slowly (busy, or reloading its models) keeps its calls longer and so is sent
fewer, without any timing kept here. Large reward batches are also split across replicas
(`clients/reward.py`).

Failing over. A transient failure (`ServiceError.retryable`: refused, reset, 502/503/504, 429,
UNAVAILABLE) marks the replica avoided, for 1 s doubled at each failure in a row up to
`AVOID_MAX_S` and never less than its Retry-After, and sets the error's `failover` when another
replica is not avoided: the retry loop (`clients/retry.py`) then sends the next attempt at once, to
that replica, inside the same call deadline. When every replica is avoided the call backs off as
with one server and asks the replica that comes back first; one answer clears a replica's record.
Nothing here probes replicas in the background: an avoided replica is tried again by the next call
after its time is up (a refused connection costs a millisecond and fails over at once).
"""

from __future__ import annotations

import ipaddress
import itertools
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar
from urllib.parse import urlsplit

from assay.clients.errors import ServiceError, Unavailable

C = TypeVar("C")
Kind = Literal["http", "grpc"]

RESOLVE_EVERY_S = 30.0  # re-resolve a service address this often (CoreDNS's default TTL)
RESOLVE_SOON_S = 2.0  # ...and this soon when every replica is failing: the pods may have moved
AVOID_S = 1.0  # a replica that failed is avoided this long, doubled at each failure in a row
AVOID_MAX_S = 10.0  # ...up to this: a restarted replica takes calls again within it
DNS_HTTP = ("dns+http://", "dns+https://")
DNS_GRPC = "dns:///"


@dataclass(frozen=True)
class Address:
    """Where one replica is reached (`url`: an HTTP base URL, or a gRPC host:port target), and the
    name it is asked for when that is not the address's own (`name`, host[:port]; `server_name`: the
    TLS name)."""

    url: str
    name: str | None = None
    server_name: str | None = None


def split(spec: str | Sequence[str]) -> list[str]:
    """`spec` as a list of addresses: one string, a string of comma-separated ones, or a sequence."""
    parts = [spec] if isinstance(spec, str) else list(spec)
    out = [a.strip() for part in parts for a in part.split(",") if a.strip()]
    if not out:
        raise ValueError(f"no address given (got {spec!r})")
    return out


def _bracketed(ip: str) -> str:
    return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip


def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to for TCP, in the resolver's order, each once."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


@dataclass(frozen=True)
class Source:
    """One address as given: fixed, or a service address resolved to several."""

    given: str
    kind: Kind
    host: str = ""  # the name to resolve; empty for a fixed address
    port: int = 0
    scheme: str = ""
    path: str = ""  # a base URL's path (a Ray Serve route prefix, say), kept on every replica's URL

    @classmethod
    def parse(cls, given: str, kind: Kind) -> Source:
        if kind == "http" and given.startswith(DNS_HTTP):
            rest = given.removeprefix("dns+")
            parts = urlsplit(rest)
            if not parts.hostname or parts.query or parts.fragment:
                raise ValueError(f"a service address is dns+http(s)://NAME:PORT[/path], got {given!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            return cls(given, kind, parts.hostname, port, parts.scheme, parts.path.rstrip("/"))
        if kind == "grpc" and given.startswith(DNS_GRPC):
            host, _, digits = given.removeprefix(DNS_GRPC).rpartition(":")
            if not host or not digits.isdigit():
                raise ValueError(f"a gRPC service address is dns:///NAME:PORT, got {given!r}")
            return cls(given, kind, host.strip("[]"), int(digits))
        return cls(given, kind)

    def addresses(self) -> list[Address]:
        """The replicas this source names now (a service address: one per address its name resolves to)."""
        if not self.host:
            return [Address(self.given.rstrip("/") if self.kind == "http" else self.given)]
        name = f"{_bracketed(self.host) if _is_ip(self.host) else self.host}:{self.port}"
        found = [_bracketed(ip) for ip in resolve(self.host, self.port)]
        if self.kind == "grpc":
            return [Address(f"{ip}:{self.port}", name, self.host) for ip in found]
        return [Address(f"{self.scheme}://{ip}:{self.port}{self.path}", name, self.host) for ip in found]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(eq=False)
class Replica(Generic[C]):
    """One replica: its address, what talks to it (a transport, an httpx client), and its record here."""

    address: Address
    conn: C
    outstanding: int = 0  # this client's calls in flight to it
    failures: int = 0  # failures in a row
    avoid_until: float = 0.0  # on the monotonic clock

    @property
    def url(self) -> str:
        return self.address.url


@dataclass(eq=False)
class Replicas(Generic[C]):
    """The replicas of one service a client talks to (see the module docstring).

    `make(address)` builds what talks to one replica; what a re-resolution drops is handed back by
    `take_dropped`, for the client to close (the async ones close on their event loop)."""

    sources: list[Source]
    make: Callable[[Address], C]
    service: str
    _replicas: list[Replica[C]] = field(default_factory=list)
    _resolved_at: float = -1e9
    _turn: Iterator[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _dropped: list[C] = field(default_factory=list)
    _found: dict[Source, list[Address]] = field(default_factory=dict)  # each source's last addresses

    @classmethod
    def of(cls, spec: str | Sequence[str], kind: Kind, make: Callable[[Address], C], service: str) -> Replicas[C]:
        pool = cls([Source.parse(a, kind) for a in split(spec)], make, service)
        pool.refresh()
        return pool

    @property
    def resolves(self) -> bool:
        """Whether a source is a service address (so the replicas can change)."""
        return any(s.host for s in self.sources)

    def __len__(self) -> int:
        return len(self._replicas)

    def urls(self) -> list[str]:
        return [r.url for r in self._replicas]

    def all(self) -> list[Replica[C]]:
        """Every replica now (for what goes to each: weight pushes, versions, probes)."""
        return list(self._replicas)

    # --- resolution --------------------------------------------------------------------------

    def due(self) -> bool:
        """Whether a service address should be resolved again now."""
        if not self.resolves:
            return False
        age = time.monotonic() - self._resolved_at
        failing = not self._replicas or all(r.avoid_until > time.monotonic() for r in self._replicas)
        return age > RESOLVE_EVERY_S or (failing and age > RESOLVE_SOON_S)

    def refresh_if_due(self) -> None:
        if self.due():
            self.refresh()

    def refresh(self) -> None:
        """Resolve the service addresses again: keep the replicas still named (and their record),
        add the new ones, drop the gone. A name that does not resolve keeps what it had."""
        for source in self.sources:
            try:
                self._found[source] = source.addresses()
            except OSError:  # DNS failed (or has no address yet): keep what this source had
                self._found.setdefault(source, [])
        wanted = [a for source in self.sources for a in self._found[source]]
        with self._lock:
            self._resolved_at = time.monotonic()
            known = {r.address: r for r in self._replicas}
            wanted = list(dict.fromkeys(wanted))
            self._replicas = [known.get(a) or Replica(a, self.make(a)) for a in wanted]
            self._dropped.extend(r.conn for a, r in known.items() if a not in wanted)

    def take_dropped(self) -> list[C]:
        """What talked to replicas that are gone, for the caller to close (once)."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return dropped

    # --- choosing and recording --------------------------------------------------------------

    def pick(self) -> Replica[C]:
        """The replica for the next call: of those not avoided, the fewest in flight, ties in turn;
        when every one is avoided, the one that comes back first. Unavailable when there is none."""
        with self._lock:
            if not self._replicas:
                names = ", ".join(s.given for s in self.sources)
                raise Unavailable(f"{self.service}: {names} resolves to no address")
            now, n = time.monotonic(), len(self._replicas)
            start = next(self._turn) % n
            order = self._replicas[start:] + self._replicas[:start]
            live = [r for r in order if r.avoid_until <= now]
            chosen = min(live, key=lambda r: r.outstanding) if live else min(order, key=lambda r: r.avoid_until)
            chosen.outstanding += 1
            return chosen

    def live(self) -> int:
        """How many replicas are not avoided now (at least 1: calls still go somewhere)."""
        now = time.monotonic()
        return max(1, sum(r.avoid_until <= now for r in self._replicas))

    def release(self, replica: Replica[C], err: BaseException | None) -> None:
        """The call to `replica` ended: answered (err None, or a failure that is the request's own),
        or failed transiently, which has the replica avoided and says on `err` whether another can
        take the next attempt at once."""
        with self._lock:
            replica.outstanding -= 1
            if not isinstance(err, ServiceError) or not err.retryable:
                replica.failures, replica.avoid_until = 0, 0.0
                return
            now = time.monotonic()
            if replica.avoid_until <= now:  # calls already in flight when it went down count as one failure
                replica.failures += 1
            avoid = min(AVOID_MAX_S, AVOID_S * 2.0 ** (replica.failures - 1))
            replica.avoid_until = max(replica.avoid_until, now + max(avoid, err.retry_after_s or 0.0))
            err.failover = any(r.avoid_until <= now for r in self._replicas if r is not replica)

    @contextmanager
    def use(self, replica: Replica[C] | None = None) -> Iterator[Replica[C]]:
        """A replica for one call (`pick()`'s, or `replica` for a call that must go to that one, which
        then never fails over), released with how the call ended."""
        chosen = self.pick() if replica is None else self._hold(replica)
        try:
            yield chosen
        except BaseException as err:
            self.release(chosen, err)
            if replica is not None and isinstance(err, ServiceError):
                err.failover = False
            raise
        self.release(chosen, None)

    def _hold(self, replica: Replica[C]) -> Replica[C]:
        with self._lock:
            replica.outstanding += 1
        return replica
