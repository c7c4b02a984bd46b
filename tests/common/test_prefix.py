"""Prefix block hashes (block size, salt, determinism) and the shared prefix LRU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from infermesh.common.prefix import PrefixLRU, block_hashes, cache_salt

IDS = list(range(1000, 1100))  # six full blocks of 16, three of 32


def test_one_hash_per_full_block_chained_and_uint64() -> None:
    hashes = block_hashes(IDS, 16, cache_salt("m"))
    assert len(hashes) == 6 and len(set(hashes)) == 6
    assert all(0 <= h < 1 << 64 for h in hashes)
    assert block_hashes(IDS[:40], 16, cache_salt("m")) == hashes[:2]  # a partial block is not hashed
    changed = [*IDS[:5], 7, *IDS[6:]]  # the first block differs: so does every hash after it
    assert not set(block_hashes(changed, 16, cache_salt("m"))) & set(hashes)


def test_the_block_size_is_required_and_changes_the_hashes() -> None:
    with pytest.raises(TypeError):
        block_hashes(IDS)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        block_hashes(IDS, 0)
    by16, by32 = block_hashes(IDS, 16, "m"), block_hashes(IDS, 32, "m")
    assert len(by32) == 3 and not set(by16) & set(by32)


def test_the_salt_changes_every_hash() -> None:
    plain = block_hashes(IDS, 16)
    for salt in (cache_salt("m"), cache_salt("other"), cache_salt("m", version="2"), cache_salt("m", adapter="a")):
        salted = block_hashes(IDS, 16, salt)
        assert all(a != b for a, b in zip(plain, salted, strict=True)), salt
    assert block_hashes(IDS, 16, cache_salt("m")) == block_hashes(IDS, 16, cache_salt("m"))
    assert cache_salt("m", "v", "") != cache_salt("m", "", "v")


def test_equal_salts_agree_across_processes() -> None:
    code = ("import json, sys; from infermesh.common.prefix import block_hashes, cache_salt; "
            "print(json.dumps(block_hashes(json.loads(sys.argv[1]), 16, cache_salt('m', 'v1'))))")
    expected = block_hashes(IDS, 16, cache_salt("m", "v1"))
    for seed in ("1", "2"):  # string hashing randomized differently in each
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", code, json.dumps(IDS)], env=env, capture_output=True,
                             text=True, check=True, timeout=60).stdout
        assert json.loads(out) == expected


def test_lru_matches_the_contiguous_leading_run() -> None:
    lru = PrefixLRU(1000)
    hashes = block_hashes(IDS, 16, "m")
    lru.insert(hashes[:4])
    assert lru.match(hashes) == 4
    assert lru.match(block_hashes(IDS, 16, "other")) == 0
    lru = PrefixLRU(1000)
    lru.insert(hashes[1:])  # as after the chain's head was evicted
    assert lru.match(hashes) == 0
    lru.insert(hashes[:1])
    assert lru.match(hashes) == len(hashes)


def test_lru_evicts_the_least_recent_and_a_prompts_tail_before_its_head() -> None:
    older, newer = block_hashes(IDS, 16, "a"), block_hashes(IDS, 16, "b")
    lru = PrefixLRU(8)
    lru.insert(older)  # six blocks
    lru.insert(newer[:4])  # two of older's must go: its last two
    assert len(lru) == 8
    assert lru.match(older) == 4 and lru.match(newer) == 4
    lru.insert(older[:1])  # touched: older's head is now the most recent
    lru.insert(block_hashes(IDS, 16, "c")[:3])  # the three least recently used go: older's blocks 1 to 3
    assert lru.match(older) == 1 and lru.match(newer) == 4
    longer = PrefixLRU(3)
    longer.insert(older)  # a prompt longer than the whole LRU keeps its head
    assert len(longer) == 3 and longer.match(older) == 3


def test_lru_of_capacity_zero_holds_nothing() -> None:
    lru = PrefixLRU(0)
    hashes = block_hashes(IDS, 16, "m")
    lru.insert(hashes)
    assert len(lru) == 0 and lru.match(hashes) == 0
    assert PrefixLRU(-5).capacity == 0
