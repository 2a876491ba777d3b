"""The HTTP edge both services share: refuse what a browser sends cross-site, and check the API
key before the body is read. Neither service's types are used here; each passes how it answers.

A web page can make a browser send a "simple" request (a POST with a text/plain, form or multipart
body, any Origin) to any address, loopback included, with no CORS preflight; and a DNS-rebinding
page can even read the answers, because its own host name now resolves to 127.0.0.1. So:

- `CrossSiteGuard` (ASGI middleware, every request): `Host` must name this server. On a loopback
  bind only 127.0.0.1, localhost and [::1] are accepted (any port); beyond loopback the operator's
  `--allowed-host` names, or any host when none is given (API keys are required there). A
  rebinding page's Host is its own name, and is refused. A state-changing request (POST, PUT,
  PATCH, DELETE) that the browser marks as sent from elsewhere is refused too: an `Origin` other
  than the server's own, or a `Sec-Fetch-Site` other than same-origin or none. Programs (httpx,
  the openai SDK, curl) send neither header and pass.
- `GuardedRoute` (the app's route class): a route's `KeyCheck` runs before its body is read, so
  an unauthenticated request learns nothing about body parsing (401, never 400), and then the
  body's content type must be one the route documents: application/json for a JSON body, the
  types of its OpenAPI `requestBody` otherwise. A text/plain or form body is never read (415).

Refusals are 403 (415 for the content type), in the service's own error shape. gRPC is out of a
browser's reach and has none of this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from fastapi import Request
from fastapi.params import Depends
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from assay.base.connections import is_loopback

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# Sec-Fetch-Site values a browser sends for a request the user or this server's own page made
OWN_FETCH_SITES = frozenset({"same-origin", "none"})


def allowed_hosts(bind_host: str, configured: Iterable[str] = ()) -> tuple[str, ...] | None:
    """The Host names a server bound to `bind_host` answers; None: any.

    Loopback: the loopback names and `configured`. Beyond loopback: `configured`, or any.
    A name may start with `*.` (any subdomain), and `*` is any host, as in starlette's TrustedHostMiddleware."""
    names = tuple(_normal(h) for h in configured)
    if "*" in names:
        return None
    if is_loopback(bind_host):
        return (*LOOPBACK_HOSTS, *names)
    return names or None


def _normal(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


def _split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` as (name, port); None when it is not a host at all."""
    try:
        parts = urlsplit(f"//{value}")
        return _normal(parts.hostname or ""), parts.port
    except ValueError:  # a port that is not a number, an unbalanced bracket
        return None


def _host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    return any(name == a or (a.startswith("*.") and name.endswith(a[1:])) for a in allowed)


class CrossSiteGuard:
    """Refuse requests for another host name, and state-changing requests a browser sent cross-site.

    `refuse(status, message)` builds the service's error response."""

    def __init__(
        self, app: ASGIApp, refuse: Callable[[int, str], Response], hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    ) -> None:
        self.app, self.refuse, self.hosts = app, refuse, hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            problem = self.problem(scope)
            if problem is not None:
                return await self.refuse(403, problem)(scope, receive, send)
        await self.app(scope, receive, send)

    def problem(self, scope: Scope) -> str | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        host = headers.get("host")
        own = _split_host(host) if host is not None else None
        if host is not None and self.hosts is not None and (own is None or not _host_allowed(own[0], self.hosts)):
            names = ", ".join(f"[{h}]" if ":" in h else h for h in self.hosts)
            return f"this server does not answer for the host {host!r} (DNS rebinding?); it answers {names}"
        if scope["method"] in SAFE_METHODS:
            return None
        site = headers.get("sec-fetch-site")
        if site is not None and site.lower() not in OWN_FETCH_SITES:
            return f"cross-site requests are refused (Sec-Fetch-Site: {site})"
        origin = headers.get("origin")
        if origin is not None and not _same_origin(origin, scope["scheme"], own):
            return f"requests from another origin are refused (Origin: {origin})"
        return None


def _same_origin(origin: str, scheme: str, own: tuple[str, int | None] | None) -> bool:
    """`origin` is this server's own (the scheme it was reached by, and the Host asked for)."""
    try:
        parts = urlsplit(origin)
        port = parts.port or DEFAULT_PORTS.get(parts.scheme)
    except ValueError:
        return False
    if own is None or origin == "null":
        return False
    return (parts.scheme, _normal(parts.hostname or ""), port) == (scheme, own[0], own[1] or DEFAULT_PORTS.get(scheme))


class KeyCheck:
    """A route's API-key check, declared as `dependencies=[KeyCheck.depends(check)]` where
    `check(authorization header or None)` raises the service's 401/403 error.

    Under `GuardedRoute` it runs before the body is read; elsewhere, as an ordinary dependency."""

    def __init__(self, check: Callable[[str | None], None]) -> None:
        self.check = check

    async def __call__(self, request: Request) -> None:
        self.check(request.headers.get("authorization"))

    @classmethod
    def depends(cls, check: Callable[[str | None], None]) -> Depends:
        return Depends(cls(check))


class GuardedRoute(APIRoute):
    """An APIRoute that checks the key, then the content type, then reads the body.

    FastAPI reads and parses a JSON body before it runs any dependency, so a key check declared
    as a dependency would answer invalid JSON with 400 before it answered a missing key with 401."""

    def __init__(self, path: str, endpoint: Callable, *, dependencies: list[Depends] | None = None, **kwargs) -> None:
        deps = list(dependencies or ())
        self.key_checks = [d.dependency for d in deps if isinstance(d.dependency, KeyCheck)]
        super().__init__(
            path, endpoint, dependencies=[d for d in deps if not isinstance(d.dependency, KeyCheck)], **kwargs
        )
        documented = ((self.openapi_extra or {}).get("requestBody") or {}).get("content")
        self.body_types = tuple(documented) if documented else ("application/json",) if self.body_field else ()

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            for check in self.key_checks:
                await check(request)
            if self.body_types and request.method not in SAFE_METHODS:
                self._check_content_type(request.headers.get("content-type"))
            return await handler(request)

        return guarded

    def _check_content_type(self, value: str | None) -> None:
        media_type = (value or "").split(";", 1)[0].strip().lower()
        if media_type not in self.body_types:
            sent = f"Content-Type: {value}" if value else "no Content-Type"
            raise HTTPException(415, f"send the body as {' or '.join(self.body_types)} ({sent} was sent)")
