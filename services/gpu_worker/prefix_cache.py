"""A model of a prefix cache: an LRU of chained token-block hashes.

The simulated engine uses it to decide how much of a prompt is already
"cached" (its prefill is then shorter) and to report a hit rate, the way vLLM's
automatic prefix caching does with KV blocks.

Eviction follows vLLM: a request's blocks go back to the free queue in reverse
order, so within a prompt the tail is evicted before the head, and what stays
cached of an older prompt is a usable prefix rather than blocks that follow a
missing one. A lookup counts only the contiguous run of cached blocks from the
first (a block is usable only with all of its predecessors).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from infermesh.common.prefix import block_hashes


class PrefixCache:
    """Holds up to `capacity_blocks` block hashes; least recently used first, a prompt's tail before its head."""

    def __init__(self, capacity_blocks: int, block_size: int, window: int = 256) -> None:
        self.capacity_blocks = max(0, capacity_blocks)
        self.block_size = block_size
        self._blocks: OrderedDict[int, None] = OrderedDict()
        # (prompt tokens, cached tokens) of recent requests, for the hit rate.
        self._recent: deque[tuple[int, int]] = deque(maxlen=window)

    def __len__(self) -> int:
        return len(self._blocks)

    def lookup_and_insert(self, ids: list[int]) -> int:
        """The number of leading tokens of `ids` already cached; then caches all of its blocks."""
        hashes = block_hashes(ids, self.block_size)
        hits = 0
        for h in hashes:
            if h not in self._blocks:
                break
            hits += 1
        # Touched last to first: the head ends most recently used, so the tail is evicted first.
        for h in reversed(hashes):
            if h in self._blocks:
                self._blocks.move_to_end(h)
            elif self.capacity_blocks:
                self._blocks[h] = None
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)
        # Like vLLM, the last prompt token is always computed (it yields the first logits).
        cached = min(hits * self.block_size, max(0, len(ids) - 1))
        self._recent.append((len(ids), cached))
        return cached

    def hit_rate(self) -> float:
        total = sum(p for p, _ in self._recent)
        return sum(c for _, c in self._recent) / total if total else 0.0
