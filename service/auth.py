"""Bearer tokens with roles (API.md, Authentication).

Roles nest: ``admin`` implies ``write`` implies ``read``. Tokens come from
``LRSERVE_TOKENS`` (``role:token`` or ``name:role:token`` entries, commas between them)
and/or a tokens file (one entry per line). A token's name (its role when unnamed) is the
*actor* of what it does. Tokens are compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from pathlib import Path

from lrserve.service.errors import Forbidden, Unauthorized

ROLES = ("read", "write", "admin")
_RANK = {role: i for i, role in enumerate(ROLES)}


class TokenError(ValueError):
    """The token configuration is malformed (raised at start-up)."""


@dataclass(frozen=True)
class Identity:
    """Who a request acts as: the token's name (the actor on events) and its role."""

    name: str
    role: str


LOCAL = Identity("local", "admin")  # every caller of a server with no token configured


def parse_tokens(text: str, *, source: str) -> dict[str, Identity]:
    """``role:token`` / ``name:role:token`` entries (commas or newlines between them) -> {token: identity}.

    Three fields with a role in the middle are ``name:role:token``; otherwise the first
    field is the role and the rest is the token (which may itself contain ``:``).
    """
    tokens: dict[str, Identity] = {}
    for n, item in enumerate(text.replace("\n", ",").split(","), start=1):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        fields = item.split(":", 2)
        if len(fields) == 3 and fields[1] in _RANK:
            name, role, token = fields
        else:
            role, _, token = item.partition(":")
            name = role
        if role not in _RANK or not token or not name:
            raise TokenError(f"{source}: entry {n} is not role:token or name:role:token with role in {ROLES}")
        tokens[token.strip()] = Identity(name.strip(), role)
    return tokens


def load_tokens(env_value: str, tokens_file: Path | None) -> dict[str, Identity]:
    """Every configured token; ``{}`` (an open server) only when none is configured at all.

    Raises:
        TokenError: an entry is malformed, the file cannot be read, or a configuration
            was given (``LRSERVE_TOKENS`` not empty, or a file) that yields no token: the
            operator meant to close the server, so it must not come up open.
    """
    tokens = parse_tokens(env_value, source="LRSERVE_TOKENS")
    if tokens_file is not None:
        try:
            text = Path(tokens_file).read_text()
        except OSError as exc:
            raise TokenError(f"cannot read the tokens file {tokens_file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError:  # its message would quote the file's bytes: maybe a token
            raise TokenError(f"cannot read the tokens file {tokens_file}: not UTF-8 text") from None
        tokens.update(parse_tokens(text, source=str(tokens_file)))
    if not tokens and (env_value or tokens_file is not None):
        given = " and ".join(
            name for name, used in (("LRSERVE_TOKENS", env_value), (str(tokens_file), tokens_file)) if used
        )
        raise TokenError(
            f"{given} holds no role:token entry (only blanks, commas or # comments): "
            "the server would be open to everyone; add a token or unset it"
        )
    return tokens


class Authenticator:
    """Checks the ``Authorization`` header against the configured tokens."""

    def __init__(self, tokens: dict[str, Identity]) -> None:
        self._tokens = [(t.encode(), identity) for t, identity in tokens.items()]

    @property
    def open(self) -> bool:
        """No token configured: every caller is admin (the server binds loopback only)."""
        return not self._tokens

    def identify(self, authorization: str | None) -> Identity:
        if self.open:
            return LOCAL
        scheme, _, candidate = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not candidate:
            raise Unauthorized("missing bearer token (send 'Authorization: Bearer <token>')")
        found = None
        given = candidate.strip().encode()
        for token, identity in self._tokens:  # compare with every token: time does not depend on which
            if hmac.compare_digest(given, token):
                found = identity
        if found is None:
            raise Unauthorized("unknown token")
        return found

    def require(self, authorization: str | None, role: str) -> Identity:
        identity = self.identify(authorization)
        if _RANK[identity.role] < _RANK[role]:
            raise Forbidden(f"this route needs the {role!r} role; the token has {identity.role!r}")
        return identity
