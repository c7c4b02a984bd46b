"""Prefix hashes of token blocks, shared by routing (scheduler) and the simulated cache.

`block_hashes(ids, block_size)` returns one hash per full block of the prompt,
each chained to the previous one, so equal hashes at position i mean equal
prompts up to the end of block i (as in vLLM's prefix caching). Hashes are
deterministic across processes and fit in a uint64 (proto `fixed64`).
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 16
_MASK = (1 << 64) - 1


def block_hashes(ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE) -> list[int]:
    """Chained hashes of the full blocks of `ids` (a partial last block is not hashed)."""
    out: list[int] = []
    prev = 0
    for start in range(0, len(ids) - block_size + 1, block_size):
        # Tuples of ints hash the same in every process (no hash randomization).
        prev = hash((prev, tuple(ids[start:start + block_size]))) & _MASK
        out.append(prev)
    return out
