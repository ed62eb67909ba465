"""Bearer-token authentication, shared by the gRPC port and the HTTP port."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from .errors import Unauthenticated

__all__ = ["BearerTokens"]

_PREFIX = "Bearer "


class BearerTokens:
    """The tokens that admit a call; none means every call is admitted.

    Tokens are kept as SHA-256 digests and compared in constant time, so that neither the
    time taken nor the order of the tokens tells a caller how close a guess was.
    """

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._digests = [hashlib.sha256(t.encode()).digest() for t in sorted(tokens)]

    @property
    def required(self) -> bool:
        """True if calls must carry a token."""
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Admit an ``authorization`` header value of the form ``Bearer <token>``.

        Raises:
            Unauthenticated: tokens are required and the header holds none of them.
        """
        if not self._digests:
            return
        presented = b""
        if authorization is not None and authorization.startswith(_PREFIX):
            presented = authorization.removeprefix(_PREFIX).encode()
        digest = hashlib.sha256(presented).digest()
        match = False
        for token in self._digests:  # no early exit: the time does not depend on which matched
            match |= hmac.compare_digest(digest, token)
        if not presented or not match:
            raise Unauthenticated(
                "missing or invalid bearer token (send 'authorization: Bearer <token>')",
                reason="UNAUTHENTICATED",
            )
