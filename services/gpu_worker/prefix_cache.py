"""A model of a prefix cache: an LRU of chained token-block hashes.

The simulated engine uses it to decide how much of a prompt is already
"cached" (its prefill is then shorter) and to report a hit rate, the way vLLM's
automatic prefix caching does with KV blocks.

Eviction follows vLLM: a request's blocks go back to the free queue in reverse
order, so within a prompt the tail is evicted before the head, and what stays
cached of an older prompt is a usable prefix rather than blocks that follow a
missing one. A lookup counts only the contiguous run of cached blocks from the
first (a block is usable only with all of its predecessors). Both rules are the
shared `PrefixLRU`'s, the same the scheduler keeps per worker.
"""

from __future__ import annotations

from collections import deque

from infermesh.common.prefix import PrefixLRU, block_hashes


class PrefixCache:
    """Holds up to `capacity_blocks` block hashes; least recently used first, a prompt's tail before its head."""

    def __init__(self, capacity_blocks: int, block_size: int, window: int = 256) -> None:
        self.block_size = block_size
        self._lru = PrefixLRU(capacity_blocks)
        # (prompt tokens, cached tokens) of recent requests, for the hit rate.
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._lru)

    def lookup_and_insert(self, ids: list[int]) -> int:
        """The number of leading tokens of `ids` already cached; then caches all of its blocks."""
        hashes = block_hashes(ids, self.block_size)  # one engine, one model: no salt needed
        hits = self._lru.match(hashes)
        self._lru.insert(hashes)
        # Like vLLM, the last prompt token is always computed (it yields the first logits).
        cached = min(hits * self.block_size, max(0, len(ids) - 1))
        self._recent.append((len(ids), cached))
        return cached

    def hit_rate(self) -> float:
        total = sum(p for p, _ in self._recent)
        return sum(c for _, c in self._recent) / total if total else 0.0
