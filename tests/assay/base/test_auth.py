"""API keys: a Bearer header, or the password of HTTP Basic authentication (what aiohttp and
requests send for a URL's `user:password@`, the only way the peers' header-less clients carry one)."""

from __future__ import annotations

import base64

import pytest

from assay.base.auth import ApiKeys
from assay.base.errors import PermissionDenied, Unauthenticated

pytestmark = pytest.mark.unit

KEY = "a-score-key-of-24-chars"


def basic(user_password: str) -> str:
    return "Basic " + base64.b64encode(user_password.encode()).decode()


def test_a_key_is_taken_as_bearer_or_as_basics_password():
    keys = ApiKeys([f"{KEY}:score"])
    keys.check(f"Bearer {KEY}", "score")
    keys.check(basic(f"assay:{KEY}"), "score")
    keys.check(basic(f":{KEY}"), "score")  # the user name is not read
    with pytest.raises(PermissionDenied):
        keys.check(basic(f"assay:{KEY}"), "admin")


@pytest.mark.parametrize(
    "authorization",
    [None, "", KEY, f"Token {KEY}", basic(KEY), basic(f"{KEY}:wrong"), "Basic not-base64!", "Basic " + "//79"],
)
def test_anything_else_is_unauthenticated(authorization):
    with pytest.raises(Unauthenticated):
        ApiKeys([f"{KEY}:score"]).check(authorization, "score")
