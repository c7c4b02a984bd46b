"""The sticky split of a versioned model's requests (infermesh.common.versions): the key's precedence, the
bucket, the split's shares and order, and that a canary's growing weight moves only stable sessions to it."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st
from infermesh.common.versions import BUCKETS, bucket, split, sticky_key

KEYS = [f"session:{i}" for i in range(20_000)]


def shares(canaries: list[tuple[str, float]], stable: str = "v1", model: str = "chat") -> dict[str, float]:
    """Each version's share of KEYS' requests."""
    counts = Counter(split(canaries, stable, bucket(model, key)) for key in KEYS)
    return {version: n / len(KEYS) for version, n in counts.items()}


# ---- the key ----

@pytest.mark.parametrize(("given_", "expected"), [
    ({"session": "s", "user": "u", "tenant": "t"}, "session:s"),
    ({"user": "u", "tenant": "t"}, "user:u"),
    ({"tenant": "t"}, "tenant:t"),
    ({"session": "", "user": "", "tenant": "t"}, "tenant:t"),
    ({"tenant": "anonymous"}, ""),
    ({"user": "u", "tenant": "anonymous"}, "user:u"),
    ({}, ""),
])
def test_sticky_key_takes_the_session_then_the_user_then_the_tenant(given_: dict[str, str], expected: str) -> None:
    assert sticky_key(**given_) == expected


def test_keys_of_different_kinds_never_collide() -> None:
    # A user named like a tenant is not that tenant's bucket.
    assert len({sticky_key(session="x"), sticky_key(user="x"), sticky_key(tenant="x")}) == 3


# ---- the bucket ----

@given(st.text(max_size=40), st.text(min_size=1, max_size=40))
def test_a_keys_bucket_is_the_same_every_time_and_in_range(model: str, key: str) -> None:
    at = bucket(model, key)
    assert 0 <= at < BUCKETS and bucket(model, key) == at


def test_the_bucket_depends_on_the_model_too() -> None:
    # Not every model puts a session in the same place: canaries of two models do not take the same sessions.
    assert sum(bucket("chat", k) != bucket("code", k) for k in KEYS[:200]) > 190


def test_without_a_key_the_bucket_is_random() -> None:
    drawn = {bucket("chat", "") for _ in range(200)}
    assert len(drawn) > 150 and all(0 <= b < BUCKETS for b in drawn)


def test_buckets_spread_evenly() -> None:
    tenths = Counter(bucket("chat", key) * 10 // BUCKETS for key in KEYS)
    assert set(tenths) == set(range(10))
    assert all(abs(n / len(KEYS) - 0.1) < 0.01 for n in tenths.values())


# ---- the split ----

def test_the_shares_follow_the_weights() -> None:
    got = shares([("v2", 10), ("v3", 25.5)])
    assert got["v2"] == pytest.approx(0.10, abs=0.01)
    assert got["v3"] == pytest.approx(0.255, abs=0.01)
    assert got["v1"] == pytest.approx(0.645, abs=0.01)


def test_canaries_take_the_first_buckets_in_the_catalogs_order() -> None:
    canaries = [("v2", 10), ("v3", 20)]
    assert [split(canaries, "v1", at) for at in (0, 999, 1000, 2999, 3000, BUCKETS - 1)] == \
        ["v2", "v2", "v3", "v3", "v1", "v1"]
    # The other order: v3 first.
    assert [split(canaries[::-1], "v1", at) for at in (0, 1999, 2000, 2999, 3000)] == \
        ["v3", "v3", "v2", "v2", "v1"]


def test_a_canary_of_weight_0_takes_nothing() -> None:
    assert {split([("v2", 0), ("v3", 5)], "v1", at) for at in range(BUCKETS)} == {"v1", "v3"}
    assert {split([("v2", 0)], "v1", at) for at in range(BUCKETS)} == {"v1"}
    assert split([], "v1", 0) == "v1"


def test_a_small_weight_is_its_share_of_the_buckets() -> None:
    taken = Counter(split([("v2", 0.05), ("v3", 1)], "v1", at) for at in range(BUCKETS))
    assert (taken["v2"], taken["v3"], taken["v1"]) == (5, 100, BUCKETS - 105)


@pytest.mark.parametrize("canaries", [
    [("v2", 100.0)],
    [("v2", 50.0), ("v3", 50.0)],
    [("v2", 100 / 3), ("v3", 100 / 3), ("v4", 100 / 3)],
    [("v2", 0.1), ("v3", 99.9)],
])
def test_canaries_of_100_percent_leave_the_stable_version_nothing(canaries: list[tuple[str, float]]) -> None:
    taken = Counter(split(canaries, "v1", at) for at in range(BUCKETS))
    assert "v1" not in taken and sum(taken.values()) == BUCKETS


# ---- stickiness ----

def test_as_a_canary_grows_only_stable_keys_move_to_it() -> None:
    previous: set[str] | None = None
    for weight in range(10, 51, 5):
        on_canary = {k for k in KEYS if split([("v2", weight)], "v1", bucket("chat", k)) == "v2"}
        assert len(on_canary) / len(KEYS) == pytest.approx(weight / 100, abs=0.01)
        if previous is not None:
            assert previous <= on_canary, f"keys left the canary at {weight} %"
        previous = on_canary


@given(st.floats(10, 50), st.floats(10, 50), st.integers(0, BUCKETS - 1))
def test_a_bucket_on_the_canary_stays_on_it_at_a_larger_weight(a: float, b: float, at: int) -> None:
    low, high = sorted((a, b))
    if split([("v2", low)], "v1", at) == "v2":
        assert split([("v2", high)], "v1", at) == "v2"
    if split([("v2", high)], "v1", at) == "v1":
        assert split([("v2", low)], "v1", at) == "v1"
