"""A worker whose load stream goes silent (the process stopped, the connection still open) is excluded
after --stale-after, and taken back when its reports resume."""

from __future__ import annotations

import os
import signal
import time

from infermesh.v1 import scheduler_pb2

from tests.fixtures.scheduler import list_workers, wait_workers


def test_a_silent_worker_is_unreachable_after_stale_after_and_comes_back(sim_worker_factory,
                                                                         scheduler_factory) -> None:
    worker = sim_worker_factory(max_num_seqs=2)
    scheduler = scheduler_factory([worker.address], stale_after=0.5, report_interval_ms=50)
    pgid = os.getpgid(worker.proc.pid)
    os.killpg(pgid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        wait_workers(scheduler.address, 1, scheduler_pb2.WORKER_STATE_UNREACHABLE, timeout=10)
        silent = time.monotonic() - stopped
    finally:
        os.killpg(pgid, signal.SIGCONT)
    assert 0.4 < silent < 5, silent
    wait_workers(scheduler.address, 1, timeout=20)
    assert [w.state for w in list_workers(scheduler.address)] == [scheduler_pb2.WORKER_STATE_READY]
