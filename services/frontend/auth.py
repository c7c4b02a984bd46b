"""Optional API keys: `name:key,name2:key2`; each name is a tenant for the scheduler's fairness.

Keys are compared in constant time and never logged. With no keys configured
every caller is the tenant "anonymous".
"""

from __future__ import annotations

import hmac

from infermesh.common.errors import InvalidRequest, Unauthenticated

ANONYMOUS = "anonymous"


class ApiKeys:
    def __init__(self, spec: str = "") -> None:
        self._keys: list[tuple[bytes, str]] = []
        for i, item in enumerate(x.strip() for x in spec.split(",")):
            if not item:
                continue
            name, sep, key = item.partition(":")
            if not sep or not name.strip() or not key.strip():
                # The message names the position, never the key.
                raise InvalidRequest(f"API key entry {i + 1} must look like name:key")
            self._keys.append((key.strip().encode(), name.strip()))

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._keys)} keys)"

    def tenant(self, authorization: str | None) -> str:
        """The tenant for an `Authorization` value ("Bearer KEY"); Unauthenticated if not valid."""
        if not self._keys:
            return ANONYMOUS
        if not authorization:
            raise Unauthenticated("Missing API key: send it as `Authorization: Bearer <key>`.")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("Malformed Authorization header: expected `Bearer <key>`.")
        given = token.strip().encode()
        found = None
        for key, name in self._keys:  # every key compared, in constant time each
            if hmac.compare_digest(key, given):
                found = name
        if found is None:
            raise Unauthenticated("Incorrect API key provided.")
        return found
