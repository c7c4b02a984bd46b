"""Stop strings matched across token boundaries.

Text arrives in pieces (one per token or per coalesced delta). `StopMatcher`
returns the text that is safe to send: everything except a tail that could be
the start of a stop string. When a stop string completes, the text before it
is returned and the matcher is done; the stop string itself is never sent.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    """Finds the first stop string in a stream of text pieces."""

    __slots__ = ("stops", "held", "stopped", "matched", "_max_len")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._max_len = max((len(s) for s in self.stops), default=0)
        self.held = ""
        self.stopped = False
        self.matched: str | None = None

    def feed(self, piece: str) -> str:
        """Text that can be sent now (possibly empty)."""
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        text = self.held + piece
        # The earliest stop string wins; only new text can complete one.
        search_from = max(0, len(self.held) - self._max_len + 1)
        first = -1
        for stop in self.stops:
            at = text.find(stop, search_from)
            if at != -1 and (first == -1 or at < first):
                first, self.matched = at, stop
        if first != -1:
            self.stopped = True
            self.held = ""
            return text[:first]
        keep = self._possible_prefix_len(text)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        """At the end of generation: the held tail was not a stop string after all."""
        out, self.held = self.held, ""
        return "" if self.stopped else out

    def _possible_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
