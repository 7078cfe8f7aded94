"""Bearer tokens with roles (API.md, Authentication).

Roles nest: ``admin`` implies ``write`` implies ``read``. Tokens come from
``LRSERVE_TOKENS`` (``role:token,role:token``) and/or a tokens file (one per line).
They are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from service.errors import Forbidden, Unauthorized

ROLES = ("read", "write", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


class TokenError(ValueError):
    """The token configuration is malformed (raised at start-up)."""


def parse_tokens(text: str, *, source: str) -> dict[str, str]:
    """``role:token`` pairs (commas or newlines between them) -> {token: role}."""
    tokens: dict[str, str] = {}
    for n, item in enumerate(text.replace("\n", ",").split(","), start=1):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        role, sep, token = item.partition(":")
        if not sep or role not in _RANK or not token:
            raise TokenError(f"{source}: entry {n} is not role:token with role in {ROLES}")
        tokens[token] = role
    return tokens


def load_tokens(env_value: str, tokens_file: Path | None) -> dict[str, str]:
    tokens = parse_tokens(env_value, source="LRSERVE_TOKENS")
    if tokens_file is not None:
        tokens.update(parse_tokens(tokens_file.read_text(), source=str(tokens_file)))
    return tokens


class Authenticator:
    """Checks the ``Authorization`` header against the configured tokens."""

    def __init__(self, tokens: dict[str, str]) -> None:
        self._tokens = [(t.encode(), role) for t, role in tokens.items()]

    @property
    def open(self) -> bool:
        """No token configured: every caller is admin (the server binds loopback only)."""
        return not self._tokens

    def role_of(self, authorization: str | None) -> str:
        if self.open:
            return "admin"
        scheme, _, candidate = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not candidate:
            raise Unauthorized("missing bearer token (send 'Authorization: Bearer <token>')")
        found = None
        given = candidate.strip().encode()
        for token, role in self._tokens:  # compare with every token: time does not depend on which
            if hmac.compare_digest(given, token):
                found = role
        if found is None:
            raise Unauthorized("unknown token")
        return found

    def require(self, authorization: str | None, role: str) -> str:
        have = self.role_of(authorization)
        if _RANK[have] < _RANK[role]:
            raise Forbidden(f"this route needs the {role!r} role; the token has {have!r}")
        return have
