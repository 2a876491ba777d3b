"""What the reward and policy clients share over HTTP: the address, the key, and reading an answer.

The I/O itself stays with each client (httpx's sync and async clients are two objects); these
pure pieces are what the two would otherwise copy.
"""

from __future__ import annotations

import os
import ssl
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ValidationError

from assay.clients.errors import HttpDialect, ServerError, http_error, problems
from assay.clients.replicas import Address

M = TypeVar("M", bound=BaseModel)


def base_url(url: str, service: str) -> str:
    """`url` without a trailing slash; ValueError unless it is an http(s) base URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{service}'s HTTP address is a base URL like http://127.0.0.1:8000, got {url!r}")
    return url.rstrip("/")


CaCert = str | os.PathLike[str] | None
"""A CA bundle (PEM) to trust for the server's certificate, in place of the default roots."""


def read_ca(ca_cert: CaCert) -> bytes | None:
    """The bundle's bytes (for gRPC's channel credentials); ValueError naming a file that is not there."""
    if ca_cert is None:
        return None
    try:
        with open(ca_cert, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"ca_cert {ca_cert}: {exc.strerror}") from None


def verify(ca_cert: CaCert) -> ssl.SSLContext | bool:
    """What httpx checks an https:// server's certificate against: `ca_cert`, or by default httpx's
    own choice (the bundle in SSL_CERT_FILE or SSL_CERT_DIR when set, else certifi's)."""
    pem = read_ca(ca_cert)
    if pem is None:
        return True
    try:
        return ssl.create_default_context(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError):
        raise ValueError(f"ca_cert {ca_cert} is not a PEM bundle of CA certificates") from None


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"} if api_key else {}


def client_headers(address: Address, api_key: str | None) -> dict[str, str]:
    """The headers every request to `address` carries: the key, and Host when the replica is asked
    for a service name rather than its own address (`clients/replicas.py`)."""
    return {**auth_headers(api_key), **({"host": address.name} if address.name else {})}


def extensions(address: Address) -> dict[str, Any]:
    """httpx's per-request extensions for `address`: the TLS server name (SNI, and the name the
    certificate is checked against) when it is a service name's, not the IP connected to."""
    return {"sni_hostname": address.server_name} if address.server_name else {}


def json_body(req: BaseModel | None) -> Any:
    """A request model as the JSON it is sent as (unset optional fields left out)."""
    return req.model_dump(mode="json", exclude_none=True) if req is not None else None


def reply(r: httpx.Response, model: type[M], dialect: HttpDialect) -> M:
    """The answer parsed as `model`; the typed error when it is not a 200 or not a `model`."""
    if r.status_code != 200:
        raise http_error(r, dialect)
    try:
        return model.model_validate_json(r.content)
    except ValidationError as exc:
        raise ServerError(
            f"{r.request.method} {r.request.url}: the reply is not a {model.__name__}: {problems(exc)}", status=200
        ) from None
