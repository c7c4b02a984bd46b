"""Which version of a versioned model serves a request: the sticky split, the one rule every tier applies.

A request's bucket is a hash of the model's name and its key (`sticky_key`: the
`x-session-id` header, else the `user` field, else the API key's tenant; none:
a random bucket), one of `BUCKETS`. The canaries take the first buckets, in the
catalog's order, each as many as its weight says; the stable version takes the
rest. So a session stays on its version while the weights hold, and as a
canary's weight grows only sessions of the stable version move to it.

The weights are the scheduler's (`VersionSplits`: the catalog's traffic after
rollout steps, rollbacks and readiness); `split(...)` is a pure function of
them, so every frontend sends the same session to the same version.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

BUCKETS = 10_000
VERSION_HEADER = "x-infermesh-model-version"  # pins a version (request); names the version that served (response)
SESSION_HEADER = "x-session-id"
ANONYMOUS_TENANTS = frozenset({"", "anonymous"})  # no key: not a session (a random bucket per request)


def sticky_key(*, session: str = "", user: str = "", tenant: str = "") -> str:
    """What keeps a caller on one version: its session, else its `user`, else its tenant ('' for none)."""
    if session:
        return f"session:{session}"
    if user:
        return f"user:{user}"
    return f"tenant:{tenant}" if tenant not in ANONYMOUS_TENANTS else ""


def bucket(model: str, key: str) -> int:
    """The request's bucket in 0..BUCKETS-1 (random without a key)."""
    if not key:
        return random.randrange(BUCKETS)
    digest = hashlib.blake2b(f"{model}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def split(canaries: Sequence[tuple[str, float]], stable: str, at: int) -> str:
    """The version bucket `at` falls in: `canaries` as (version, percent) in the catalog's order take the
    first buckets, `stable` the rest."""
    edge = 0.0
    for version, weight in canaries:
        edge += weight * BUCKETS / 100
        if at < edge:
            return version
    return stable
