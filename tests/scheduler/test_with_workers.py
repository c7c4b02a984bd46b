"""The scheduler as a real process over simulated worker processes.

Capacity is never exceeded under 500 concurrent admissions, a draining worker
gets no new leases, a killed worker is excluded within a second with its
leases released (and taken back when it returns), and two scheduler replicas
over the same workers never overcommit them together.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import time
import urllib.request

import grpc
import pytest
from infermesh.common.errors import RETRY_AFTER_KEY
from infermesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

from tests.fixtures.scheduler import list_workers, wait_workers
from tests.harness import ServiceProcess

READY, DRAINING, UNREACHABLE = (scheduler_pb2.WORKER_STATE_READY, scheduler_pb2.WORKER_STATE_DRAINING,
                                scheduler_pb2.WORKER_STATE_UNREACHABLE)
PROMPT, MAX_TOKENS = 100, 16


class Mesh:
    """Clients of one or more schedulers and the workers they route to (one event loop)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.refused = 0  # Generate refused by a worker (RESOURCE_EXHAUSTED)
        self.rejected: list[int | None] = []  # queue-full rejections: their retry-after-ms
        self.leases_by_worker: collections.Counter[str] = collections.Counter()

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self.channels:
            self.channels[address] = grpc.aio.insecure_channel(address)
        return self.channels[address]

    def scheduler(self, address: str) -> scheduler_pb2_grpc.SchedulerStub:
        return scheduler_pb2_grpc.SchedulerStub(self.channel(address))

    async def admit(self, scheduler: str, **kw) -> scheduler_pb2.Lease:
        request = scheduler_pb2.AdmitRequest(model=self.model, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS, **kw)
        while True:
            try:
                lease = await self.scheduler(scheduler).Admit(request, timeout=60)
                self.leases_by_worker[lease.worker_address] += 1
                return lease
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                hint = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
                self.rejected.append(int(hint) if hint is not None else None)
                await asyncio.sleep(min(0.5, int(hint or 100) / 1000))

    async def generate(self, lease: scheduler_pb2.Lease, max_tokens: int = MAX_TOKENS, n: int = 1) -> int:
        stub = worker_pb2_grpc.WorkerStub(self.channel(lease.worker_address))
        request = worker_pb2.GenerateTokensRequest(
            model=self.model, lease_id=lease.lease_id, prompt_ids=list(range(1, PROMPT + 1)),
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True, n=n))
        tokens = 0
        async for delta in stub.Generate(request, timeout=60):
            tokens += len(delta.token_ids)
        return tokens

    async def request(self, scheduler: str, n: int = 1) -> None:
        """Admit, then generate under the lease; a refusal goes back to the scheduler."""
        while True:
            lease = await self.admit(scheduler, n=n)
            try:
                assert await self.generate(lease, n=n) == n * MAX_TOKENS
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    raise
                self.refused += 1
                await self.scheduler(scheduler).Release(scheduler_pb2.ReleaseRequest(
                    lease_id=lease.lease_id, outcome=scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED))

    async def close(self) -> None:
        for ch in self.channels.values():
            await ch.close()


class LoadWatch:
    """Follows a worker's own load reports: the most it ever held."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.max_held = 0
        self.max_committed = 0
        self.reports = 0
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as ch:
            async for r in worker_pb2_grpc.WorkerStub(ch).WatchLoad(worker_pb2.WatchLoadRequest(
                    watcher="test", interval_ms=10)):
                self.reports += 1
                self.max_held = max(self.max_held, r.running + r.waiting, len(r.leases_active))
                self.max_committed = max(self.max_committed, r.committed_tokens)

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


def metrics_text(proc: ServiceProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as reply:
        return reply.read().decode()


async def poll(predicate, timeout: float, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def state_of(scheduler: ServiceProcess, worker: ServiceProcess) -> scheduler_pb2.WorkerStatus:
    return next(w for w in list_workers(scheduler.address) if w.address == worker.address)


async def test_capacity_is_never_exceeded_under_500_concurrent_admissions(
        sim_worker_factory, scheduler_factory, model_name: str) -> None:
    # One worker bound by sequences (8), one by KV tokens (5 requests of 116 tokens fit in 600).
    by_seqs = sim_worker_factory(max_num_seqs=8, sim_ttft_ms=5, sim_itl_ms=2)
    by_kv = sim_worker_factory(max_num_seqs=64, sim_kv_capacity_tokens=600, sim_ttft_ms=5, sim_itl_ms=2)
    scheduler = scheduler_factory([by_seqs.address, by_kv.address], policy="least_load")
    mesh = Mesh(model_name)
    watches = [LoadWatch(by_seqs.address), LoadWatch(by_kv.address)]
    try:
        await asyncio.wait_for(asyncio.gather(*(mesh.request(scheduler.address) for _ in range(500))), 120)
    finally:
        for w in watches:
            await w.stop()
        await mesh.close()
    # A worker refuses what it cannot hold: with one scheduler, a single refusal would be an overcommit.
    assert mesh.refused == 0
    assert watches[0].max_held <= 8 and watches[1].max_committed <= 600
    assert watches[0].max_held == 8 and watches[1].max_held == 5  # both were filled to capacity
    assert sum(mesh.leases_by_worker.values()) == 500
    # 500 at once overflow the 128-place queue: refused at once, each with a retry-after hint.
    assert mesh.rejected and all(h is not None and h > 0 for h in mesh.rejected)
    text = metrics_text(scheduler)
    assert f'infermesh_scheduler_admitted_total{{model="{model_name}"}} 500.0' in text
    assert f'infermesh_scheduler_rejected_total{{reason="queue_full"}} {len(mesh.rejected)}.0' in text
    assert 'infermesh_scheduler_routing_decisions_total{outcome="least_loaded",policy="least_load"} 500.0' in text
    assert f'infermesh_scheduler_queue_depth{{model="{model_name}",priority="normal"}} 0.0' in text
    assert "infermesh_scheduler_queue_time_seconds_count" in text
    assert f'infermesh_scheduler_worker_free_seqs{{model="{model_name}",worker="{by_seqs.address}"}}' in text


async def test_requests_of_n_choices_at_capacity_are_never_refused(
        sim_worker_factory, scheduler_factory, model_name: str) -> None:
    # A request of n choices holds n sequences and 100 + n * 16 KV tokens on the worker.
    by_seqs = sim_worker_factory(max_num_seqs=8, sim_ttft_ms=5, sim_itl_ms=2)
    by_kv = sim_worker_factory(max_num_seqs=64, sim_kv_capacity_tokens=600, sim_ttft_ms=5, sim_itl_ms=2)
    scheduler = scheduler_factory([by_seqs.address, by_kv.address], policy="least_load")
    mesh = Mesh(model_name)
    watches = [LoadWatch(by_seqs.address), LoadWatch(by_kv.address)]
    try:
        await asyncio.wait_for(asyncio.gather(*(mesh.request(scheduler.address, n=2 + i % 3)
                                                for i in range(120))), 120)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await mesh.admit(scheduler.address, n=65)  # more sequences than any worker runs
    finally:
        for w in watches:
            await w.stop()
        await mesh.close()
    # With one scheduler, a single refusal would be an overcommit (one sequence per lease was).
    assert mesh.refused == 0
    assert sum(mesh.leases_by_worker.values()) == 120
    assert watches[0].reports and watches[1].reports
    assert 6 <= watches[0].max_held <= 8  # filled with several requests of n choices at once
    assert 600 - (100 + 4 * 16) < watches[1].max_committed <= 600
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n (65 sequences)" in err.value.details()


async def test_a_draining_worker_gets_no_new_leases(sim_worker_factory, scheduler_factory, model_name: str) -> None:
    draining = sim_worker_factory(max_num_seqs=4, sim_itl_ms=20, grace_period=20)
    other = sim_worker_factory(max_num_seqs=4, sim_itl_ms=2)
    scheduler = scheduler_factory([draining.address, other.address], policy="round_robin")
    mesh = Mesh(model_name)
    try:
        # A long stream keeps the worker draining (not gone) for a few seconds after SIGTERM.
        held = await mesh.admit(scheduler.address, exclude_workers=[other.address])
        assert held.worker_address == draining.address
        stream = asyncio.create_task(mesh.generate(held, max_tokens=150))
        await poll(lambda: state_of(scheduler, draining).load.running == 1, 5)
        draining.signal(signal.SIGTERM)
        await poll(lambda: state_of(scheduler, draining).state == DRAINING, 5)
        for _ in range(20):
            lease = await mesh.admit(scheduler.address)
            assert lease.worker_address == other.address
            await mesh.scheduler(scheduler.address).Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.admit(scheduler.address, exclude_workers=[other.address])
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert state_of(scheduler, draining).state == DRAINING
        assert await stream == 150  # the in-flight stream finished during the drain
        await poll(lambda: state_of(scheduler, draining).state == UNREACHABLE, 10)
    finally:
        await mesh.close()


async def test_a_killed_worker_is_excluded_within_a_second_and_taken_back(
        sim_worker_factory, scheduler_factory, model_name: str, tmp_path) -> None:
    victim = sim_worker_factory(max_num_seqs=8, sim_itl_ms=20)
    survivor = sim_worker_factory(max_num_seqs=8, sim_itl_ms=2)
    scheduler = scheduler_factory([victim.address, survivor.address], policy="round_robin")
    mesh = Mesh(model_name)
    try:
        leases = [await mesh.admit(scheduler.address) for _ in range(8)]
        on_victim = [x for x in leases if x.worker_address == victim.address]
        assert len(on_victim) == 4
        streams = [asyncio.create_task(mesh.generate(x, max_tokens=500)) for x in on_victim[:2]]
        await poll(lambda: state_of(scheduler, victim).load.running == 2, 5)
        assert state_of(scheduler, victim).pending_leases == 2  # two leases never started
        victim.kill()
        killed = time.monotonic()
        status = await poll(lambda: (s := state_of(scheduler, victim)).state == UNREACHABLE and s, 5, 0.005)
        assert time.monotonic() - killed < 1.0
        assert status.pending_leases == 0
        stub = mesh.scheduler(scheduler.address)
        for lease in on_victim:  # every lease on it ended with it
            assert not (await stub.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id))).found
        results = await asyncio.gather(*streams, return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
        for _ in range(4):
            assert (await mesh.admit(scheduler.address)).worker_address == survivor.address
        # The same address comes back: the scheduler reconnects and routes to it again.
        again = ServiceProcess("sim-worker-again", victim.args, port=victim.port, log_dir=tmp_path).start()
        try:
            again.wait_healthy(timeout=60)
            await poll(lambda: state_of(scheduler, victim).state == READY, 10)
            lease = await mesh.admit(scheduler.address, exclude_workers=[survivor.address])
            assert lease.worker_address == victim.address
        finally:
            again.stop()
    finally:
        await mesh.close()


async def test_two_schedulers_never_overcommit_the_workers_together(
        sim_worker_factory, scheduler_factory, model_name: str) -> None:
    workers = [sim_worker_factory(max_num_seqs=4, sim_ttft_ms=5, sim_itl_ms=3) for _ in range(2)]
    addresses = [w.address for w in workers]
    schedulers = [scheduler_factory(addresses, policy="least_load"),
                  scheduler_factory(addresses, policy="least_load")]
    mesh = Mesh(model_name)
    watches = [LoadWatch(a) for a in addresses]
    try:
        clients = [mesh.request(schedulers[i % 2].address) for i in range(300)]
        await asyncio.wait_for(asyncio.gather(*clients), 120)
    finally:
        for w in watches:
            await w.stop()
        await mesh.close()
    assert all(w.reports > 10 and w.max_held <= 4 for w in watches)
    assert all(w.max_held == 4 for w in watches)  # both were used to capacity
    # Each replica sees the other's leases in the workers' reports within milliseconds, so the
    # workers rarely have to refuse a lease (and the caller then simply asks again).
    assert mesh.refused <= 0.1 * 300, mesh.refused
    for scheduler in schedulers:
        for status in list_workers(scheduler.address):
            assert status.state == READY and status.pending_leases == 0


def test_scheduler_process_reports_bad_configuration(scheduler_factory) -> None:
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "infermesh.cli", "scheduler", "--workers", "nohost",
                             "--policy", "round_robin", "--max-queue", "-1"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "expected host:port" in result.stderr and "max_queue must be >= 0" in result.stderr


async def test_unknown_model_and_no_workers(scheduler_factory, sim_worker_factory, model_name: str) -> None:
    worker = sim_worker_factory(max_num_seqs=2)
    scheduler = scheduler_factory([worker.address])
    mesh = Mesh(model_name)
    try:
        stub = mesh.scheduler(scheduler.address)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Admit(scheduler_pb2.AdmitRequest(model="no-such-model", prompt_tokens=5))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Admit(scheduler_pb2.AdmitRequest(model=model_name, prompt_tokens=0))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_tokens" in info.value.details()
        models = await stub.ListModels(common_pb2.ListModelsRequest())
        assert [(m.id, m.simulated) for m in models.models] == [(model_name, True)]
        worker.kill()
        await poll(lambda: state_of(scheduler, worker).state == UNREACHABLE, 5)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Admit(scheduler_pb2.AdmitRequest(model=model_name, prompt_tokens=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await mesh.close()
    assert wait_workers(scheduler.address, 1, UNREACHABLE)


async def test_workers_found_by_dns_name(sim_worker_factory, scheduler_factory, model_name: str) -> None:
    worker = sim_worker_factory(max_num_seqs=2)
    scheduler = scheduler_factory([], workers_dns=f"localhost:{worker.port}", dns_interval=0.2)
    ready = wait_workers(scheduler.address, 1)
    assert [w.address for w in ready] == [worker.address]  # localhost resolved to 127.0.0.1
    mesh = Mesh(model_name)
    try:
        lease = await mesh.admit(scheduler.address)
        assert lease.worker_address == worker.address
    finally:
        await mesh.close()
