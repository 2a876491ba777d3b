"""API keys with scopes, for both services.

Keys are given as `KEY:scope[,scope]` (the reward service's scopes: score, admin; admin implies score),
on the command line (`--api-key`, repeatable) or in ASSAY_API_KEYS separated by spaces. Only sha256
digests are kept in memory, compared in constant time. A key has at least `MIN_KEY_LENGTH`
characters. With no keys every route is open, which the server allows only on a loopback address
(where `assay.base.http_guard` keeps web pages out).

A key travels as `Authorization: Bearer <key>`, or as the password of HTTP Basic authentication
(`http://assay:<key>@host:8000/...`): the peers' reward clients (OpenRLHF, slime, veRL) send no
headers of their own, but aiohttp and requests send a URL's user and password as Basic, so a key
reaches the server with a change of URL only. The user name is not read.

Another service passes its own scope set and environment variable (the policy server:
generate, admin in ASSAY_POLICY_API_KEYS); the first scope is a bare KEY's, admin implies all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable

from assay.base.errors import PermissionDenied, Unauthenticated

SCOPES = ("score", "admin")
ENV_VAR = "ASSAY_API_KEYS"
# A key guards a server reachable beyond loopback: short ones fall to guessing. 16 characters of
# `openssl rand -hex 16` (32) or `python -c "import secrets; print(secrets.token_urlsafe())"` (43) are plenty.
MIN_KEY_LENGTH = 16


class ApiKeys:
    def __init__(self, entries: Iterable[str] = (), scopes: tuple[str, ...] = SCOPES) -> None:
        self._scopes: dict[bytes, frozenset[str]] = {}
        for entry in entries:
            key, sep, named = entry.partition(":")
            wanted = frozenset(s.strip() for s in named.split(",") if s.strip()) if sep else frozenset(scopes[:1])
            if not key or not wanted or not wanted <= set(scopes):
                raise ValueError(
                    f"API key entries look like KEY:{scopes[0]} or KEY:{','.join(scopes)}; got scopes {sorted(wanted)}"
                )
            if len(key) < MIN_KEY_LENGTH:
                raise ValueError(
                    f"an API key must be at least {MIN_KEY_LENGTH} characters; one has {len(key)} "
                    "(make one with `openssl rand -hex 16`)"
                )
            if "admin" in wanted:
                wanted |= set(scopes)
            self._scopes[hashlib.sha256(key.encode()).digest()] = wanted

    @classmethod
    def from_env(cls, extra: Iterable[str] = (), env_var: str = ENV_VAR, scopes: tuple[str, ...] = SCOPES) -> ApiKeys:
        return cls([*os.environ.get(env_var, "").split(), *extra], scopes)

    def __bool__(self) -> bool:
        return bool(self._scopes)

    def check(self, authorization: str | None, scope: str) -> None:
        """Raise `errors.Unauthenticated` / `errors.PermissionDenied` unless the bearer key holds `scope`."""
        if not self._scopes:
            return
        key = _key(authorization)
        if key is None:
            raise Unauthenticated("this route needs an API key: send `Authorization: Bearer <key>`")
        digest = hashlib.sha256(key.encode()).digest()
        scopes = next((s for d, s in self._scopes.items() if hmac.compare_digest(d, digest)), None)
        if scopes is None:
            raise Unauthenticated("the API key is not valid")
        if scope not in scopes:
            raise PermissionDenied(f"the API key lacks the {scope!r} scope (it has {', '.join(sorted(scopes))})")


def _key(authorization: str | None) -> str | None:
    """The key of a Bearer header, or the password of a Basic one; None for anything else."""
    kind, _, value = (authorization or "").strip().partition(" ")
    if kind.lower() == "bearer":
        return value.strip()
    if kind.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
            return None
    return None
