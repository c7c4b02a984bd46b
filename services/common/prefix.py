"""Prefix hashes of token blocks and the LRU that holds them, shared by routing (scheduler) and the simulated cache.

`block_hashes(ids, block_size, salt)` returns one hash per full block of the
prompt, each chained to the previous one, so equal hashes at position i mean
equal prompts up to the end of block i (as in vLLM's prefix caching). The salt
is folded into the first block's hash: it stands for everything that changes
the KV cache (model, version, adapter; see `cache_salt`), so equal prompts for
different models never share a hash. Hashes are deterministic across
processes and fit in a uint64 (proto `fixed64`).

The block size must be the engine's: the workers report it (`WorkerInfo`,
then `ModelCard.block_size`); `DEFAULT_BLOCK_SIZE` is only the fallback when no
worker has reported one.

`PrefixLRU` is the approximate cache both users keep: the scheduler one per
worker (what it routed there), the simulated engine one for its own KV.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 16  # vLLM's default; only when no worker reported its block size
_MASK = (1 << 64) - 1


def cache_salt(model: str, version: str = "", adapter: str = "") -> str:
    """The salt of `block_hashes`: everything that changes the KV cache of a prompt."""
    return "\0".join((model, version, adapter))


def _salt_seed(salt: str) -> int:
    # Not hash(str): string hashes are randomized per process.
    return int.from_bytes(hashlib.blake2b(salt.encode(), digest_size=8).digest(), "little")


def block_hashes(ids: Sequence[int], block_size: int, salt: str = "") -> list[int]:
    """Chained hashes of the full blocks of `ids` (a partial last block is not hashed).

    `salt`: everything that changes the KV cache (model, version, adapter), from `cache_salt`.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be at least 1, not {block_size}")
    out: list[int] = []
    prev = _salt_seed(salt)
    for start in range(0, len(ids) - block_size + 1, block_size):
        # Tuples of ints hash the same in every process (no hash randomization).
        prev = hash((prev, tuple(ids[start:start + block_size]))) & _MASK
        out.append(prev)
    return out


class PrefixLRU:
    """An LRU set of up to `capacity` block hashes (0: holds nothing).

    It evicts as vLLM frees a request's blocks, last to first: within a prompt the tail goes before
    the head, so what stays of an older prompt is a usable prefix.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._blocks)

    def match(self, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` held (a block counts only with all of its predecessors)."""
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        """Touches or adds every block, last to first (the head ends most recently used), then evicts."""
        blocks = self._blocks
        for h in reversed(hashes):
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity:
            blocks.popitem(last=False)
