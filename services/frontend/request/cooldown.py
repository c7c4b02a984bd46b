"""Cooldown: a model that failed often is skipped for a while, then probed again.

The catalog's `cooldown` says when: `failures` failures within `window_s`
seconds put a model in cooldown for `skip_s` seconds, during which requests go
straight to the next model of their fallback chain. After that, one request at
a time is let through as a probe: its success ends the cooldown, its failure
starts another. Only failures the error table marks `cools_down` count (the
model's own failures, not its load or a bad request). Each frontend keeps its
own account (a replica sees the failures of the requests it sent).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from infermesh.common.catalog import Cooldown
from infermesh.frontend import metrics


@dataclass
class _ModelHealth:
    failures: deque[float] = field(default_factory=deque)
    cooling_until: float | None = None  # set while in cooldown (probes included)
    probing: bool = False  # a probe is in flight


class Cooldowns:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._models: dict[str, _ModelHealth] = {}

    def admits(self, model: str) -> str:
        """"yes" (not cooling), "probe" (this request is the probe: report its outcome) or "no" (skip it)."""
        health = self._models.get(model)
        if health is None or health.cooling_until is None:
            return "yes"
        if health.probing or self.clock() < health.cooling_until:
            return "no"
        health.probing = True
        metrics.COOLDOWN_PROBES.labels(model=model).inc()
        return "probe"

    def cooling(self, model: str) -> bool:
        health = self._models.get(model)
        return health is not None and health.cooling_until is not None

    def succeeded(self, model: str) -> None:
        health = self._models.get(model)
        if health is None:
            return
        health.failures.clear()
        if health.cooling_until is not None:
            health.cooling_until, health.probing = None, False
            metrics.COOLING.labels(model=model).set(0)

    def probe_ended(self, model: str) -> None:
        """A probe that ended with no verdict (its client went away, a bad request): let another probe."""
        health = self._models.get(model)
        if health is not None:
            health.probing = False

    def failed(self, model: str, policy: Cooldown) -> None:
        now = self.clock()
        health = self._models.setdefault(model, _ModelHealth())
        if health.cooling_until is not None:  # a probe failed: another round of skipping
            health.cooling_until, health.probing = now + policy.skip_s, False
            return
        health.failures.append(now)
        while health.failures and health.failures[0] <= now - policy.window_s:
            health.failures.popleft()
        if len(health.failures) >= policy.failures:
            health.failures.clear()
            health.cooling_until = now + policy.skip_s
            metrics.COOLDOWNS.labels(model=model).inc()
            metrics.COOLING.labels(model=model).set(1)
