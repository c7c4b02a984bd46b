"""The scheduler's model versions (infermesh.scheduler.versions) on a fake clock, and the dispatcher feeding them:
readiness, rollout steps and promotion, rollback by error rate, TTFT and TPOT against the stable version, the
analysis window, the state file across restarts and catalog changes, `refuses`, `splits` and `watch`."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import pytest
from infermesh.common.catalog import Catalog, load_catalog, parse_catalog
from infermesh.common.errors import VersionRolledBack
from infermesh.scheduler import metrics
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.version_state import StateFile
from infermesh.scheduler.versions import Track, VersionBook
from infermesh.v1 import worker_pb2
from prometheus_client import REGISTRY

from tests.scheduler.fakes import Clock, FakeWorker, dispatcher

OK, FAILED = worker_pb2.LeaseResult.OUTCOME_OK, worker_pb2.LeaseResult.OUTCOME_FAILED
STABLE, CANARY, OTHER = "chat@v1", "chat@v2", "chat@v3"


def catalog_text(v2: str = "traffic: 10", rollback: str = "rollback: {min_requests: 10, window_s: 60}",
                 v2_dir: str = "/tmp/m2", v3: str = "") -> str:
    """`chat`: stable v1, canary v2 (`v2`: its traffic or rollout), and a second canary v3 when `v3` is given."""
    third = f"      - name: v3\n        weights: {{dir: /tmp/m3}}\n        {v3}\n" if v3 else ""
    return f"""\
models:
  - name: chat
    stable: v1
    versions:
      - name: v1
        weights: {{dir: /tmp/m1}}
      - name: v2
        weights: {{dir: {v2_dir}}}
        {v2}
{third}    {rollback}
"""


ROLLOUT = "rollout: [{set_weight: 10}, {pause: 30s}, {set_weight: 50}, {pause: 1m}]"


class Rig:
    """A VersionBook on a fake clock, with the served names that have a ready worker in `up`."""

    def __init__(self, catalog: Catalog | str, state: StateFile | None = None, now: float = 1000.0) -> None:
        self.clock = Clock()
        self.clock.now = now
        self.up = {STABLE}
        self.book = VersionBook(state, ready=self.up.__contains__, clock=self.clock)
        self.book.apply(parse_catalog(catalog) if isinstance(catalog, str) else catalog)

    def track(self, served: str) -> Track:
        track = self.book.track(served)
        assert track is not None, served
        return track

    def split(self) -> dict[str, tuple[str, float]]:
        """Each version's (state, weight) after an evaluation."""
        self.book.evaluate()
        return {n: (t.state, t.weight) for n, t in self.book.tracks.items()}

    def feed(self, served: str, *outcomes: int, ttft: float = 0.1, tpot: float = 0.02) -> None:
        self.book.on_results(served, results(*outcomes, ttft=ttft, tpot=tpot))

    def roll_back(self) -> None:
        """The canary's first 10 requests all fail: rolled back for its error rate."""
        self.up.add(CANARY)
        self.feed(CANARY, *[FAILED] * 10)
        assert self.split()[CANARY] == ("rolled_back", 0.0)


def results(*outcomes: int, ttft: float = 0.1, tpot: float = 0.02) -> list[worker_pb2.LeaseResult]:
    return [worker_pb2.LeaseResult(lease_id=f"l{i}", outcome=o, ttft_s=ttft if o == OK else 0.0,
                                   tpot_s=tpot if o == OK else 0.0) for i, o in enumerate(outcomes)]


def rollbacks(reason: str, version: str = "v2") -> float:
    return REGISTRY.get_sample_value("infermesh_rollbacks_total",
                                     {"model": "chat", "version": version, "reason": reason}) or 0.0


def requests_counted(outcome: str, version: str = "v2") -> float:
    return REGISTRY.get_sample_value("infermesh_scheduler_version_requests_total",
                                     {"model": "chat", "version": version, "outcome": outcome}) or 0.0


# ---- readiness and rollouts ----

def test_a_canary_without_a_ready_worker_takes_nothing_until_one_is() -> None:
    rig = Rig(catalog_text())
    assert rig.split() == {STABLE: ("stable", 100.0), CANARY: ("waiting", 0.0)}
    assert rig.track(CANARY).anchor is None
    rig.up.add(CANARY)
    assert rig.book.evaluate() is True  # the split changed
    assert rig.split() == {STABLE: ("stable", 90.0), CANARY: ("canary", 10.0)}
    assert rig.book.evaluate() is False  # nothing new
    assert REGISTRY.get_sample_value("infermesh_scheduler_version_weight", {"model": "chat", "version": "v2"}) == 10
    rig.up.discard(CANARY)  # its last worker went away
    assert rig.split() == {STABLE: ("stable", 100.0), CANARY: ("waiting", 0.0)}


def test_rollout_steps_advance_with_the_clock_from_the_first_ready_worker_to_promotion() -> None:
    rig = Rig(catalog_text(ROLLOUT, v3="traffic: 20"))
    rig.up.add(OTHER)
    rig.clock.now += 500  # no worker of v2 yet: its rollout's clock has not started
    assert rig.split()[CANARY] == ("waiting", 0.0)
    rig.up.add(CANARY)
    timeline = []
    for advance in (0, 29, 1, 59, 1):
        rig.clock.now += advance
        split = rig.split()
        timeline.append((split[CANARY], rig.track(CANARY).step, split[STABLE][1]))
    assert timeline == [
        (("canary", 10.0), 1, 70.0),  # set_weight 10, then the 30 s pause
        (("canary", 10.0), 1, 70.0),
        (("canary", 50.0), 3, 30.0),  # the pause is over: set_weight 50, then the minute's pause
        (("canary", 50.0), 3, 30.0),
        (("promoted", 80.0), 4, 0.0),  # every step done: all but v3's 20 %
    ]
    assert rig.track(CANARY).anchor == 1500.0
    rig.up.discard(OTHER)  # v3 stops taking traffic: the promoted version takes it all
    assert rig.split() == {STABLE: ("stable", 0.0), CANARY: ("promoted", 100.0), OTHER: ("waiting", 0.0)}


def test_two_canaries_promoted_share_no_more_than_all_the_traffic() -> None:
    rig = Rig(catalog_text("rollout: [{set_weight: 40}]", v3="rollout: [{set_weight: 50}]"))
    rig.up.update({CANARY, OTHER})
    split = rig.split()
    assert split[CANARY] == ("promoted", 100.0) and split[OTHER] == ("promoted", 0.0)  # the first in the file's order
    assert split[STABLE] == ("stable", 0.0)
    assert sum(weight for _, weight in split.values()) == 100.0


# ---- rollback ----

def test_a_canary_failing_more_than_the_threshold_is_rolled_back_once_it_has_min_requests() -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    before = rollbacks("error_rate"), rollbacks("ttft")
    rig.feed(CANARY, *[FAILED] * 9)
    assert rig.split()[CANARY] == ("canary", 10.0)  # 9 requests: fewer than min_requests (10)
    rig.feed(CANARY, OK)
    assert rig.split() == {STABLE: ("stable", 100.0), CANARY: ("rolled_back", 0.0)}
    assert rig.track(CANARY).rolled_back == ("error_rate", 1000.0)
    assert (rollbacks("error_rate"), rollbacks("ttft")) == (before[0] + 1, before[1])
    rig.feed(CANARY, *[FAILED] * 10)
    rig.split()
    assert rollbacks("error_rate") == before[0] + 1  # once
    rig.up.discard(CANARY)
    assert rig.split()[CANARY] == ("rolled_back", 0.0)  # not back to waiting


def test_no_rollback_when_the_stable_version_fails_as_often() -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    rig.feed(STABLE, *[FAILED] * 2, *[OK] * 8)
    rig.feed(CANARY, *[FAILED] * 2, *[OK] * 8)  # 20 %: far above 1 %, but no worse than stable
    assert rig.split()[CANARY] == ("canary", 10.0)
    rig.feed(CANARY, FAILED)  # 3 of 11: worse than stable
    assert rig.split()[CANARY] == ("rolled_back", 0.0)


def test_the_default_threshold_is_one_percent_over_100_requests() -> None:
    rig = Rig(catalog_text(rollback=""))
    rig.up.add(CANARY)
    rig.feed(CANARY, *[FAILED] * 2, *[OK] * 97)
    assert rig.split()[CANARY][0] == "canary"  # 99 requests: below the default min_requests
    rig = Rig(catalog_text(rollback=""))
    rig.up.add(CANARY)
    rig.feed(CANARY, FAILED, *[OK] * 99)
    assert rig.split()[CANARY][0] == "canary"  # exactly 1 %: not above it
    rig.feed(CANARY, FAILED)
    assert rig.split()[CANARY][0] == "rolled_back"
    assert rig.track(CANARY).rolled_back is not None and rig.track(CANARY).rolled_back[0] == "error_rate"


@pytest.mark.parametrize(("canary", "stable", "stable_n", "expected"), [
    ({"ttft": 0.2}, {"ttft": 0.1}, 10, "ttft"),  # 2x the stable version's p95 (threshold 1.5x)
    ({"ttft": 0.14}, {"ttft": 0.1}, 10, ""),  # 1.4x
    ({"ttft": 0.2}, {"ttft": 0.1}, 9, ""),  # the stable version has fewer than min_requests
    ({"tpot": 0.05}, {"tpot": 0.02}, 10, "tpot"),  # 2.5x
    ({"tpot": 0.025}, {"tpot": 0.02}, 10, ""),  # 1.25x
])
def test_rollback_on_latency_against_the_stable_versions(canary: dict[str, float], stable: dict[str, float],
                                                         stable_n: int, expected: str) -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    before = rollbacks(expected or "ttft")
    rig.feed(STABLE, *[OK] * stable_n, **stable)
    rig.feed(CANARY, *[OK] * 10, **canary)
    rig.book.evaluate()
    track = rig.track(CANARY)
    assert (track.rolled_back[0] if track.rolled_back else "") == expected
    assert track.state == ("rolled_back" if expected else "canary")
    assert rollbacks(expected or "ttft") == before + (1 if expected else 0)


def test_the_latency_analysis_needs_min_requests_of_the_canary_too() -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    rig.feed(STABLE, *[OK] * 50, ttft=0.1)
    rig.feed(CANARY, *[OK] * 9, ttft=1.0)
    assert rig.split()[CANARY][0] == "canary"
    rig.feed(CANARY, OK, ttft=1.0)
    assert rig.split()[CANARY][0] == "rolled_back" and rig.track(CANARY).rolled_back == ("ttft", 1000.0)


def test_samples_older_than_the_window_leave_it() -> None:
    rig = Rig(catalog_text())  # window_s 60
    rig.up.add(CANARY)
    rig.feed(CANARY, *[FAILED] * 5)
    rig.clock.now += 31
    rig.feed(CANARY, *[FAILED] * 4)
    assert rig.split()[CANARY][0] == "canary" and rig.track(CANARY).stats.requests == 9
    rig.clock.now += 30  # the first five are 61 s old
    rig.feed(CANARY, FAILED)
    assert rig.split()[CANARY][0] == "canary"
    assert (rig.track(CANARY).stats.requests, rig.track(CANARY).stats.failed) == (5, 5)
    rig.clock.now += 61
    rig.feed(CANARY, *[OK] * 10)  # the failures are gone: ten good requests
    assert rig.split()[CANARY][0] == "canary" and rig.track(CANARY).stats.error_rate == 0.0


def test_reloading_the_same_catalog_keeps_the_window_and_the_rollback() -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    rig.feed(CANARY, *[OK] * 4)
    rig.book.apply(parse_catalog(catalog_text()))
    assert len(rig.track(CANARY).window.samples) == 4
    rig.roll_back()
    rig.book.apply(parse_catalog(catalog_text()))
    assert rig.split()[CANARY] == ("rolled_back", 0.0)
    rig.book.apply(parse_catalog(catalog_text("traffic: 20")))  # a new definition: a new canary
    assert rig.split()[CANARY] == ("canary", 20.0) and not rig.track(CANARY).window.samples


# ---- the state file ----

def write_catalog(tmp_path: Path, text: str) -> Catalog:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return load_catalog(path)


def restarted(tmp_path: Path, text: str, now: float = 1000.0) -> Rig:
    """A scheduler (re)started over the state file and the catalog file in `tmp_path`."""
    rig = Rig(write_catalog(tmp_path, text), StateFile(tmp_path / "state" / "versions.json"), now)
    rig.up.add(CANARY)
    return rig


def test_a_restarted_scheduler_keeps_the_rollback(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = restarted(tmp_path, catalog_text())
    first.roll_back()
    saved = json.loads((tmp_path / "state" / "versions.json").read_text())
    assert list(saved["catalogs"]) == [str((tmp_path / "catalog.yaml").resolve())]
    again = restarted(tmp_path, catalog_text(), now=2000.0)
    assert again.split() == {STABLE: ("stable", 100.0), CANARY: ("rolled_back", 0.0)}
    assert again.track(CANARY).rolled_back == ("error_rate", 1000.0)
    assert again.book.refuses(CANARY, pinned=False)
    assert "stays rolled back (error_rate, from the state file)" in caplog.text


def test_a_restarted_scheduler_continues_the_rollout_where_it_was(tmp_path: Path) -> None:
    first = restarted(tmp_path, catalog_text(ROLLOUT))
    assert first.split()[CANARY] == ("canary", 10.0) and first.track(CANARY).anchor == 1000.0
    again = restarted(tmp_path, catalog_text(ROLLOUT), now=1040.0)
    assert again.split()[CANARY] == ("canary", 50.0)  # 40 s into its rollout, not restarted at 10 %
    assert again.track(CANARY).anchor == 1000.0 and again.track(CANARY).step == 3


@pytest.mark.parametrize("changed", [
    {"v2_dir": "/tmp/m2-retrained"},
    {"v2": "traffic: 20"},
    {"rollback": "rollback: {min_requests: 10, window_s: 60}\n    engine: {max_model_len: 1024}"},
], ids=["new-weights", "new-traffic", "new-inherited-engine"])
def test_a_catalog_that_changes_the_version_starts_it_afresh(tmp_path: Path, changed: dict[str, str]) -> None:
    first = restarted(tmp_path, catalog_text())
    first.roll_back()
    old = first.track(CANARY).entry.fingerprint()
    again = restarted(tmp_path, catalog_text(**changed), now=2000.0)
    state, weight = again.split()[CANARY]
    assert state == "canary" and weight > 0 and again.track(CANARY).rolled_back is None
    assert again.track(CANARY).anchor == 2000.0
    assert not again.book.refuses(CANARY, pinned=False)
    key = str((tmp_path / "catalog.yaml").resolve())
    assert StateFile(tmp_path / "state" / "versions.json").get(key, old) == {}  # the old record is gone


@pytest.mark.parametrize("changed", [
    {"v2": "traffic: 10\n        workers: 3"},
    {"rollback": "rollback: {min_requests: 50, max_error_rate: 0.5, window_s: 600}"},
], ids=["workers", "thresholds"])
def test_a_catalog_change_outside_the_versions_definition_keeps_its_rollback(tmp_path: Path,
                                                                            changed: dict[str, str]) -> None:
    restarted(tmp_path, catalog_text()).roll_back()
    again = restarted(tmp_path, catalog_text(**changed), now=2000.0)
    assert again.split()[CANARY] == ("rolled_back", 0.0)


def test_an_unreadable_state_file_is_ignored_with_a_warning(tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    state = tmp_path / "state" / "versions.json"
    state.parent.mkdir()
    state.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="infermesh.scheduler.versions"):
        rig = restarted(tmp_path, catalog_text())
    assert "unreadable" in caplog.text and str(state) in caplog.text
    assert rig.split()[CANARY] == ("canary", 10.0)
    rig.roll_back()  # written whole again, readable
    assert "rolled_back" in json.dumps(json.loads(state.read_text()))


# ---- what the scheduler tells admission and the frontends ----

def test_refuses_a_rolled_back_version_unless_it_was_pinned() -> None:
    rig = Rig(catalog_text())
    rig.up.add(CANARY)
    rig.split()
    assert not rig.book.refuses(CANARY, pinned=False)
    rig.roll_back()
    assert rig.book.refuses(CANARY, pinned=False) and not rig.book.refuses(CANARY, pinned=True)
    assert not rig.book.refuses(STABLE, pinned=False)
    assert not rig.book.refuses("chat@v9", pinned=False) and not rig.book.refuses("plain", pinned=False)


def test_splits_name_every_version_with_its_weight_state_and_analysis() -> None:
    catalog = parse_catalog(catalog_text(ROLLOUT), "c.yaml")
    rig = Rig(catalog)
    rig.up.add(CANARY)
    rig.feed(CANARY, *[OK] * 5, ttft=0.25, tpot=0.05)
    rig.book.evaluate()
    splits = rig.book.splits()
    assert splits.catalog_digest == catalog.digest != ""
    [model] = splits.models
    assert (model.model, model.stable) == ("chat", "v1")
    v1, v2 = model.versions
    assert (v1.version, v1.served, v1.weight, v1.state, v1.steps, v1.requests) == ("v1", STABLE, 90, "stable", 0, 0)
    assert (v2.version, v2.served, v2.weight, v2.state, v2.step, v2.steps) == ("v2", CANARY, 10, "canary", 1, 4)
    assert (v2.requests, v2.error_rate, v2.reason, v2.rolled_back_at) == (5, 0.0, "", 0.0)
    assert v2.ttft_p95_s == pytest.approx(0.25) and v2.tpot_p95_s == pytest.approx(0.05)
    rig.clock.now = 1005.0
    rig.feed(CANARY, *[FAILED] * 5)
    rig.book.evaluate()
    v2 = rig.book.splits().models[0].versions[1]
    assert (v2.state, v2.weight, v2.reason, v2.rolled_back_at) == ("rolled_back", 0, "error_rate", 1005.0)
    assert v2.error_rate == pytest.approx(0.5)


def test_splits_list_nothing_for_a_catalog_without_versions() -> None:
    book = VersionBook()
    book.apply(parse_catalog("models:\n  - name: plain\n    weights: {dir: /tmp/p}\n"))
    assert not book.splits().models and not book.tracks


async def test_watch_yields_at_once_then_on_every_change() -> None:
    rig = Rig(catalog_text())
    watch = rig.book.watch()
    first = await asyncio.wait_for(anext(watch), 1)
    assert [v.state for v in first.models[0].versions] == ["stable", "waiting"]
    waiting = asyncio.ensure_future(anext(watch))
    await asyncio.sleep(0.05)
    rig.book.evaluate()  # nothing changed: no message
    await asyncio.sleep(0.05)
    assert not waiting.done()
    rig.up.add(CANARY)
    rig.book.evaluate()
    second = await asyncio.wait_for(waiting, 1)
    assert [(v.state, v.weight) for v in second.models[0].versions] == [("stable", 90), ("canary", 10)]
    await watch.aclose()


# ---- the dispatcher feeds it ----

def serving(catalog: str = catalog_text()) -> tuple[Clock, FakeWorker, FakeWorker]:
    """A dispatcher over the catalog with a ready worker for each of v1 and v2."""
    clock = Clock()
    d = dispatcher(clock=clock)
    d.versions.clock = clock
    d.versions.apply(parse_catalog(catalog))
    return clock, FakeWorker(d, "v1:1", model=STABLE), FakeWorker(d, "v2:1", model=CANARY)


def report_results(w: FakeWorker, outcomes: Iterable[int]) -> None:
    w.seq += 1
    w.dispatcher.on_report(w.address, worker_pb2.LoadReport(
        worker_id=f"w-{w.address}", model=w.model, seq=w.seq, kv_capacity_tokens=w.kv_capacity_tokens,
        max_num_seqs=w.max_num_seqs, max_model_len=w.max_model_len, results=results(*outcomes)))


async def test_the_dispatcher_counts_its_workers_results_for_their_version() -> None:
    _, _, v2 = serving()
    d = v2.dispatcher
    d.versions.evaluate()
    assert d.versions.tracks[CANARY].state == "canary"  # its worker is ready in the dispatcher
    before = requests_counted("ok"), requests_counted("failed")
    report_results(v2, [OK, OK, FAILED, worker_pb2.LeaseResult.OUTCOME_CANCELLED])
    d.versions.evaluate()
    stats = d.versions.tracks[CANARY].stats
    assert (stats.requests, stats.failed) == (3, 1)  # a cancelled request is not the version's doing
    assert (requests_counted("ok"), requests_counted("failed")) == (before[0] + 2, before[1] + 1)
    assert d.versions.tracks[STABLE].stats.requests == 0


async def test_a_lost_worker_fails_its_versions_leases() -> None:
    _, _, v2 = serving()
    d = v2.dispatcher
    for _ in range(2):
        await d.admit(Ticket(model=CANARY, tokens=10))
    before = requests_counted("worker_lost")
    d.on_lost(v2.address, "stream broke")
    assert len(d.versions.tracks[CANARY].window.samples) == 2
    assert all(failed for _, failed, _, _ in d.versions.tracks[CANARY].window.samples)
    assert requests_counted("worker_lost") == before + 2
    d.versions.evaluate()
    assert d.versions.tracks[CANARY].state == "waiting"  # its only worker is gone


async def test_admission_refuses_a_rolled_back_version_unless_pinned() -> None:
    _, _, v2 = serving()
    d = v2.dispatcher
    assert (await d.admit(Ticket(model=CANARY, tokens=10))).lease.address == v2.address
    report_results(v2, [FAILED] * 10)
    d.versions.evaluate()
    before = metrics.REJECTED.labels("rolled_back")._value.get()
    with pytest.raises(VersionRolledBack) as info:
        await d.admit(Ticket(model=CANARY, tokens=10))
    assert info.value.code.name == "FAILED_PRECONDITION" and not info.value.retry_elsewhere
    assert metrics.REJECTED.labels("rolled_back")._value.get() == before + 1
    pinned = await d.admit(Ticket(model=CANARY, tokens=10, version_pinned=True))
    assert pinned.lease.address == v2.address
    assert (await d.admit(Ticket(model=STABLE, tokens=10))).lease.address == "v1:1"
