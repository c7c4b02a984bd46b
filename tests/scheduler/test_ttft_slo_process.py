"""--ttft-slo on a real scheduler process over a slot-limited simulated worker.

A burst of Admits larger than the worker can serve within the SLO: every
admitted request waited at most the queue's budget, and once the scheduler has
seen the queue move, the excess is refused at once (RESOURCE_EXHAUSTED with a
retry-after), not after waiting the budget out.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.request

import grpc
from infermesh.common.errors import RETRY_AFTER_KEY
from infermesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc, worker_pb2, worker_pb2_grpc

SLO, BUDGET = 1.0, 0.5  # the default queue share is half the SLO
PROMPT, MAX_TOKENS = 50, 16


class Client:
    def __init__(self, scheduler: str, model: str) -> None:
        self.model = model
        self.sched_channel = grpc.aio.insecure_channel(scheduler)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self.sched_channel)
        self.worker_channels: dict[str, grpc.aio.Channel] = {}
        self.granted: list[tuple[float, float]] = []  # (queue s as the scheduler measured, admit call s)
        self.refused: list[tuple[float, int | None]] = []  # (admit call s, retry-after ms)

    async def request(self, retry: bool = False) -> None:
        """Admit, generate, release, as the frontend does; a refusal is recorded (and retried if asked)."""
        while True:
            started = time.monotonic()
            try:
                lease = await self.scheduler.Admit(scheduler_pb2.AdmitRequest(
                    model=self.model, prompt_tokens=PROMPT, max_tokens=MAX_TOKENS), timeout=30)
            except grpc.aio.AioRpcError as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                hint = dict(err.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
                self.refused.append((time.monotonic() - started, int(hint) if hint is not None else None))
                if not retry:
                    return
                await asyncio.sleep(0.05)
                continue
            self.granted.append((lease.queue_ms / 1000, time.monotonic() - started))
            break
        ch = self.worker_channels.setdefault(lease.worker_address,
                                             grpc.aio.insecure_channel(lease.worker_address))
        request = worker_pb2.GenerateTokensRequest(
            model=self.model, lease_id=lease.lease_id, prompt_ids=list(range(1, PROMPT + 1)),
            sampling=common_pb2.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
        async for _ in worker_pb2_grpc.WorkerStub(ch).Generate(request, timeout=30):
            pass
        await self.scheduler.Release(scheduler_pb2.ReleaseRequest(lease_id=lease.lease_id), timeout=5)

    async def close(self) -> None:
        for ch in [self.sched_channel, *self.worker_channels.values()]:
            await ch.close()


def rejected(metrics_port: int, reason: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith(f'infermesh_scheduler_rejected_total{{reason="{reason}"}}'):
                return float(line.split()[-1])
    return 0.0


async def test_a_burst_is_admitted_within_the_budget_and_the_excess_refused_fast(
        sim_worker_factory, scheduler_factory, model_name: str) -> None:
    # Two sequences of 16 tokens at 10 ms each: the queue moves at roughly 10 requests/s.
    worker = sim_worker_factory(max_num_seqs=2, sim_ttft_ms=5, sim_itl_ms=10)
    scheduler = scheduler_factory([worker.address], ttft_slo=SLO)
    client = Client(scheduler.address, model_name)
    try:
        await client.request()  # idle: granted at once
        assert client.granted[0][0] == 0 and not client.refused
        async def one_by_one(count: int) -> None:
            for _ in range(count):
                await client.request(retry=True)

        # History: 6 clients on 2 slots, 4 requests each (a refused one retries), so a queue forms and moves.
        await asyncio.wait_for(asyncio.gather(*(one_by_one(4) for _ in range(6))), 60)
        assert len(client.granted) == 1 + 24
        client.granted.clear()
        client.refused.clear()
        before = rejected(scheduler.metrics_port, "slo_forecast")
        await asyncio.wait_for(asyncio.gather(*(client.request() for _ in range(40))), 60)
    finally:
        await client.close()
    assert len(client.granted) + len(client.refused) == 40
    assert len(client.granted) >= 2  # the worker's own room, at least
    # Every admitted request waited at most the budget (event-loop lateness aside).
    assert max(queue for queue, _ in client.granted) <= BUDGET + 0.05, client.granted
    # The excess is refused, most of it at once rather than after the budget, each with a retry-after.
    assert len(client.refused) >= 20
    assert all(hint is not None and hint > 0 for _, hint in client.refused)
    fast = [seconds for seconds, _ in client.refused if seconds < BUDGET / 2]
    assert len(fast) >= 20, sorted(seconds for seconds, _ in client.refused)
    assert rejected(scheduler.metrics_port, "slo_forecast") - before >= len(fast)


def test_a_negative_ttft_slo_is_a_configuration_error() -> None:
    result = subprocess.run([sys.executable, "-m", "infermesh.cli", "scheduler", "--workers", "a:1",
                             "--ttft-slo", "-1", "--ttft-slo-queue-share", "2"], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2
    assert "ttft_slo must be >= 0" in result.stderr and "ttft_slo_queue_share must be in (0, 1]" in result.stderr
