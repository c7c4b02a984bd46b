"""Model versions as this scheduler sees them: the traffic split, the canary analysis, rollouts and rollback.

For each versioned model of the catalog, `VersionBook` keeps one `Track` per
version, fed by what the scheduler hears of every request:

- its workers' load reports list how each lease ended (`LeaseResult`: ok,
  failed, timed out; its time to first token and per output token): every
  scheduler replica watches every worker, so every replica hears the same;
- a worker whose stream broke ended its leases (`worker_lost`);
- a request that waited past the queue timeout for the version (`timeout`).

`evaluate()` (every `TICK_S`) turns that into the split: a canary takes its
catalog `traffic`, or what its rollout's steps say by now (the rollout's clock
starts when the canary's first worker is ready), and nothing while it has no
ready worker, is rolled back, or is waiting; the stable version takes the rest.
A canary is rolled back when over the catalog's `rollback.window_s`, with at
least `min_requests` of its requests, its error rate is above `max_error_rate`
and above the stable version's, or its p95 TTFT (or TPOT) is above the ratio
times the stable version's (which then needs `min_requests` too). A rollback
is logged, counted (`infermesh_rollbacks_total`), kept in the state file with
the rollout's start, both under the version's definition
(`ModelEntry.fingerprint`), and marked on the version's workers
(`Worker.MarkRollback`), whose every load report then carries it: a restarted
scheduler, or a new replica with an empty state file, takes the rollback on
from the first report (`on_mark`), so it neither brings a bad version back nor
restarts a rollout; a catalog that changes the version starts afresh. Every
replica applies the same rule to the same reports, so they decide alike; the
mark makes them agree even when one saw less (it started later).

Frontends follow the split through `WatchVersions` (`splits()`, `watch()`) and
apply it with `infermesh.common.versions.split`; a request split to a version
rolled back since is refused at admission (`refuses`) and goes to the stable
version.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infermesh.common.catalog import Catalog, ModelEntry
from infermesh.scheduler import metrics
from infermesh.scheduler.version_state import StateFile
from infermesh.v1 import scheduler_pb2, worker_pb2

logger = logging.getLogger(__name__)

TICK_S = 0.25  # how often the split is evaluated (rollout steps, the windows' analysis)
MARK_RESEND_S = 5.0  # a worker still without our rollback mark gets it again after this long
MAX_SAMPLES = 50_000  # per version and window: the oldest go first beyond it

_OUTCOMES = {worker_pb2.LeaseResult.OUTCOME_OK: "ok", worker_pb2.LeaseResult.OUTCOME_FAILED: "failed",
             worker_pb2.LeaseResult.OUTCOME_TIMEOUT: "timeout"}


@dataclass(frozen=True)
class Stats:
    """A version's window: its requests, the failed ones, and the p95 latencies of the others (None: none)."""

    requests: int = 0
    failed: int = 0
    ttft_p95: float | None = None
    ttft_n: int = 0
    tpot_p95: float | None = None
    tpot_n: int = 0

    @property
    def error_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0


def p95(values: list[float]) -> float | None:
    """The 95th percentile (nearest rank), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Window:
    """The samples of the last `seconds`: (time, failed, ttft or 0, tpot or 0)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: deque[tuple[float, bool, float, float]] = deque(maxlen=MAX_SAMPLES)

    def add(self, now: float, failed: bool, ttft: float = 0.0, tpot: float = 0.0) -> None:
        self.samples.append((now, failed, ttft, tpot))

    def stats(self, now: float) -> Stats:
        while self.samples and self.samples[0][0] < now - self.seconds:
            self.samples.popleft()
        failed = sum(1 for s in self.samples if s[1])
        ttfts = [s[2] for s in self.samples if not s[1] and s[2] > 0]
        tpots = [s[3] for s in self.samples if not s[1] and s[3] > 0]
        return Stats(len(self.samples), failed, p95(ttfts), len(ttfts), p95(tpots), len(tpots))


@dataclass
class Track:
    """One version: its catalog entry, its window, and what the scheduler decided of it."""

    entry: ModelEntry
    window: Window
    anchor: float | None = None  # when its rollout started (its first ready worker), unix seconds
    rolled_back: tuple[str, float] | None = None  # (reason, when)
    weight: float = 0.0
    state: str = "waiting"
    step: int = 0
    stats: Stats = field(default_factory=Stats)
    marked: dict[str, float] = field(default_factory=dict)  # worker address -> when the rollback mark was sent


class VersionBook:
    """Every versioned model's tracks, the split they give, and the watchers of that split."""

    def __init__(self, state: StateFile | None = None, *, ready: Callable[[str], bool] = lambda _: False,
                 clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.ready = ready  # whether a served name (`chat@v2`) has a ready worker now
        self.clock = clock
        self.catalog: Catalog | None = None
        self.models: dict[str, ModelEntry] = {}  # versioned models by name
        self.tracks: dict[str, Track] = {}  # by served name
        self._key = ""  # the catalog's key in the state file
        self._generation = 0
        self._changed = asyncio.Event()
        self._last: bytes = b""
        self.closing = False  # the scheduler drains: watches end (a frontend follows another replica)
        # Sends a rollback mark to a worker (address, mark): set by the scheduler's worker pool.
        self.send_mark: Callable[[str, worker_pb2.RollbackMark], None] | None = None

    # ---- the catalog ----

    def apply(self, catalog: Catalog) -> None:
        """Takes a (re)loaded catalog: tracks of unchanged versions keep their window and decisions."""
        self.catalog = catalog
        self._key = str(Path(catalog.source).resolve()) if catalog.source else ""
        old, self.tracks, self.models = self.tracks, {}, {}
        for m in catalog.models:
            if not m.versions:
                continue
            self.models[m.name] = m
            for v in m.versions:
                kept = old.get(v.name)
                if kept is not None and kept.entry.fingerprint() == v.fingerprint():
                    kept.entry = v
                    kept.window.seconds = m.rollback.window_s
                    self.tracks[v.name] = kept
                    continue
                track = Track(v, Window(m.rollback.window_s))
                record = self.state.get(self._key, v.fingerprint()) if self.state is not None else {}
                if isinstance(record.get("anchor"), (int, float)):
                    track.anchor = float(record["anchor"])
                rolled = record.get("rolled_back")
                if isinstance(rolled, dict):
                    track.rolled_back = (str(rolled.get("reason", "")), float(rolled.get("at", 0.0)))
                    logger.warning("model %s version %s stays rolled back (%s, from the state file)", m.name,
                                   v.version, track.rolled_back[0])
                self.tracks[v.name] = track
                metrics.precreate_version(m.name, v.version)
        if self.state is not None and self._key:
            self.state.keep_only(self._key, {t.entry.fingerprint() for t in self.tracks.values()})
        self.evaluate()

    def track(self, served: str) -> Track | None:
        return self.tracks.get(served)

    # ---- what it hears ----

    def on_results(self, served: str, results: Any) -> None:
        """A worker's report of how its leases ended."""
        track = self.tracks.get(served)
        if track is None or not results:
            return
        now = self.clock()
        model, version = track.entry.model, track.entry.version
        for r in results:
            outcome = _OUTCOMES.get(r.outcome)
            if outcome is None:
                continue  # cancelled by its caller: not the version's doing
            failed = outcome != "ok"
            track.window.add(now, failed, r.ttft_s, r.tpot_s)
            metrics.VERSION_REQUESTS.labels(model=model, version=version, outcome=outcome).inc()
            if not failed and r.ttft_s > 0:
                metrics.VERSION_TTFT.labels(model=model, version=version).observe(r.ttft_s)
            if not failed and r.tpot_s > 0:
                metrics.VERSION_TPOT.labels(model=model, version=version).observe(r.tpot_s)

    def on_failures(self, served: str, outcome: str, count: int = 1) -> None:
        """Failures the scheduler saw itself: `worker_lost` (leases of a worker whose stream broke), `timeout`."""
        track = self.tracks.get(served)
        if track is None or count <= 0:
            return
        now = self.clock()
        for _ in range(count):
            track.window.add(now, True)
        metrics.VERSION_REQUESTS.labels(model=track.entry.model, version=track.entry.version,
                                        outcome=outcome).inc(count)

    def on_mark(self, served: str, address: str, mark: worker_pb2.RollbackMark) -> None:
        """A worker's report carries its version's rollback mark (or none): a rollback another replica decided
        is taken on; a rollback of ours its worker does not carry yet is sent to it (again every MARK_RESEND_S)."""
        track = self.tracks.get(served)
        if track is None:
            return
        fingerprint = track.entry.fingerprint()
        if mark.fingerprint == fingerprint and track.rolled_back is None:
            track.rolled_back = (mark.reason, mark.at)
            if mark.reason in metrics.ROLLBACK_REASONS:
                metrics.ROLLBACKS.labels(model=track.entry.model, version=track.entry.version, reason=mark.reason).inc()
            logger.warning("model %s version %s rolled back (%s), as another scheduler replica decided: its "
                           "workers carry the mark", track.entry.model, track.entry.version, mark.reason)
            self._save(track)
            self.evaluate()
        elif track.rolled_back is not None and mark.fingerprint != fingerprint and self.send_mark is not None:
            now = self.clock()
            if now - track.marked.get(address, -MARK_RESEND_S) >= MARK_RESEND_S:
                track.marked[address] = now
                self.send_mark(address, worker_pb2.RollbackMark(fingerprint=fingerprint, reason=track.rolled_back[0],
                                                                at=track.rolled_back[1]))

    # ---- the decision ----

    def evaluate(self) -> bool:
        """Rollout steps, readiness and the analysis, turned into each version's weight; True when the split
        changed (its watchers are woken)."""
        now = self.clock()
        for m in self.models.values():
            stable = self.tracks.get(m.name + "@" + m.stable)
            if stable is None:
                continue
            stable.stats = stable.window.stats(now)
            canaries = [self.tracks[v.name] for v in m.canaries if v.name in self.tracks]
            for t in canaries:
                t.stats = t.window.stats(now)
                self._place(t, now)
            for t in canaries:
                if t.state in ("canary",):
                    self._analyse(m, t, stable)
            # A promoted canary takes what the others in rollout leave; when two are, the first in the file's order.
            taken = sum(c.weight for c in canaries if c.state == "canary")
            for t in canaries:
                if t.state == "promoted":
                    t.weight = max(0.0, 100.0 - taken)
                    taken += t.weight
            stable.state, stable.weight = "stable", max(0.0, 100.0 - taken)
            for t in (stable, *canaries):
                metrics.VERSION_WEIGHT.labels(model=m.name, version=t.entry.version).set(t.weight)
        return self._publish()

    def _place(self, t: Track, now: float) -> None:
        """A canary's state and weight before the analysis: rolled back, waiting, by its rollout, or its traffic."""
        steps = t.entry.rollout
        if t.rolled_back is not None:
            t.state, t.weight = "rolled_back", 0.0
            return
        if not self.ready(t.entry.name):
            t.state, t.weight = "waiting", 0.0
            return
        if t.anchor is None:
            t.anchor = now
            self._save(t)
        if not steps:
            t.state, t.weight, t.step = "canary", t.entry.traffic, 0
            return
        weight, elapsed, done = t.entry.traffic, now - t.anchor, 0
        for step in steps:
            if step.set_weight is not None:
                weight = step.set_weight
            elif step.pause_s is not None:
                if elapsed < step.pause_s:
                    break
                elapsed -= step.pause_s
            done += 1
        t.step = done
        if done == len(steps):
            if t.state != "promoted":
                logger.info("model %s version %s promoted: its rollout's %d steps are done", t.entry.model,
                            t.entry.version, len(steps))
            t.state, t.weight = "promoted", 100.0
        else:
            t.state, t.weight = "canary", weight

    def _analyse(self, m: ModelEntry, t: Track, stable: Track) -> None:
        policy, c, s = m.rollback, t.stats, stable.stats
        reason, detail = "", ""
        if c.requests >= policy.min_requests and c.error_rate > policy.max_error_rate \
                and c.error_rate > s.error_rate:
            reason = "error_rate"
            detail = (f"error rate {c.error_rate:.2%} over {c.requests} requests (threshold "
                      f"{policy.max_error_rate:.2%}; stable {s.error_rate:.2%})")
        for name, ours, theirs, ours_n, theirs_n, ratio in (
                ("ttft", c.ttft_p95, s.ttft_p95, c.ttft_n, s.ttft_n, policy.max_ttft_ratio),
                ("tpot", c.tpot_p95, s.tpot_p95, c.tpot_n, s.tpot_n, policy.max_tpot_ratio)):
            if reason or ours is None or theirs is None or theirs <= 0:
                continue
            if ours_n >= policy.min_requests and theirs_n >= policy.min_requests and ours > ratio * theirs:
                reason = name
                detail = (f"p95 {name.upper()} {ours * 1000:.1f} ms over {ours_n} requests, {ours / theirs:.2f}x "
                          f"the stable version's {theirs * 1000:.1f} ms (threshold {ratio:g}x)")
        if not reason:
            return
        t.rolled_back = (reason, self.clock())
        t.state, t.weight = "rolled_back", 0.0
        metrics.ROLLBACKS.labels(model=m.name, version=t.entry.version, reason=reason).inc()
        logger.warning("model %s version %s rolled back: %s; its traffic goes to %s", m.name, t.entry.version,
                       detail, m.stable)
        self._save(t)

    def _save(self, t: Track) -> None:
        if self.state is None or not self._key:
            return
        record: dict[str, Any] = {"model": t.entry.model, "version": t.entry.version, "anchor": t.anchor}
        if t.rolled_back is not None:
            record["rolled_back"] = {"reason": t.rolled_back[0], "at": t.rolled_back[1]}
        self.state.put(self._key, t.entry.fingerprint(), record)

    def refuses(self, served: str, pinned: bool) -> bool:
        """Whether a request split to `served` must go elsewhere: a rolled-back version not pinned by its caller."""
        track = self.tracks.get(served)
        return track is not None and track.rolled_back is not None and not pinned

    # ---- the split, for the frontends ----

    def splits(self) -> scheduler_pb2.VersionSplits:
        out = scheduler_pb2.VersionSplits(catalog_digest=self.catalog.digest if self.catalog else "")
        for m in self.models.values():
            mv = out.models.add(model=m.name, stable=m.stable)
            for v in m.versions:
                t = self.tracks.get(v.name)
                if t is None:
                    continue
                c = t.stats
                mv.versions.add(version=v.version, served=v.name, weight=round(t.weight, 4), state=t.state,
                                reason=t.rolled_back[0] if t.rolled_back else "", step=t.step,
                                steps=len(v.rollout), requests=c.requests, error_rate=c.error_rate,
                                ttft_p95_s=c.ttft_p95 or 0.0, tpot_p95_s=c.tpot_p95 or 0.0,
                                rolled_back_at=t.rolled_back[1] if t.rolled_back else 0.0)
        return out

    def _publish(self) -> bool:
        """Wakes the watchers when the split (weights and states, not the window's numbers) changed."""
        key = json.dumps([(n, t.state, round(t.weight, 4), t.step) for n, t in sorted(self.tracks.items())]).encode()
        if key == self._last:
            return False
        self._last = key
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()
        return True

    async def watch(self) -> AsyncIterator[scheduler_pb2.VersionSplits]:
        """The split now, then again on every change (and at least every few seconds, with fresh numbers)."""
        while not self.closing:
            event = self._changed
            yield self.splits()
            try:
                await asyncio.wait_for(event.wait(), timeout=5.0)
            except TimeoutError:
                pass

    def close(self) -> None:
        """Ends every watch (the scheduler is draining)."""
        self.closing = True
        self._changed.set()

    async def run(self) -> None:
        """Evaluates every TICK_S until cancelled."""
        while True:
            try:
                self.evaluate()
            except Exception:  # one bad evaluation must not stop the analysis
                logger.exception("version evaluation failed")
            await asyncio.sleep(TICK_S)

