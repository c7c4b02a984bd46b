"""The worker set: static addresses and/or DNS names, one WatchLoad stream per worker.

Each worker gets a `WorkerWatch` task: Info (model and capacity), then its
load stream, fed to the `Dispatcher`. A broken or silent stream marks the
worker unreachable at once (its leases end); the task reconnects with
exponential backoff and the first report takes the worker back. DNS names (a
Kubernetes headless service) are re-resolved periodically; addresses that
appear are watched, addresses that disappear are dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Sequence

import grpc
from infermesh.common.channels import channel
from infermesh.scheduler.dispatcher import Dispatcher
from infermesh.v1 import worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)


def split_host_port(spec: str) -> tuple[str, int]:
    host, sep, port = spec.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {spec!r}")
    return host.strip("[]"), int(port)


class WorkerWatch:
    """Keeps one worker's load stream open, reconnecting with backoff."""

    def __init__(self, address: str, dispatcher: Dispatcher, *, watcher: str, interval_ms: int,
                 stale_after: float, backoff: tuple[float, float] = (0.05, 2.0)) -> None:
        self.address = address
        self.dispatcher = dispatcher
        self.watcher = watcher
        self.interval_ms = interval_ms
        self.stale_after = stale_after
        self.backoff = backoff
        self.attempted = asyncio.Event()  # the first connection attempt is over
        self.task: asyncio.Task[None] | None = None
        self.stopping = asyncio.Event()
        self._reported = False
        self._call: grpc.aio.UnaryStreamCall | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"watch {self.address}")

    async def stop(self) -> None:
        self.stopping.set()
        if self._call is not None:
            self._call.cancel()  # ends a pending read at once
        if self.task is not None:
            self.task.cancel()
            # gRPC may report the cancellation as a CANCELLED RpcError; `stopping` ends the loop then.
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(self.task, 2.0)

    async def run(self) -> None:
        delay = self.backoff[0]
        while not self.stopping.is_set():
            self._reported = False
            try:
                await self._watch_once()
                reason = "stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.RpcError as exc:
                if self.stopping.is_set():
                    return
                reason = f"{exc.code().name if hasattr(exc, 'code') else 'error'}"
            except TimeoutError:
                reason = f"no load report for {self.stale_after:.1f}s"
            except Exception as exc:  # a bad worker must not kill the watch
                logger.exception("watching %s failed", self.address)
                reason = type(exc).__name__
            self.dispatcher.on_lost(self.address, reason)
            self.attempted.set()
            delay = self.backoff[0] if self._reported else min(self.backoff[1], delay * 2)
            await asyncio.sleep(delay)

    async def _watch_once(self) -> None:
        # No request-id interceptor: this control stream belongs to no request, and an intercepted
        # stream pays for a task and a queue hop on every report read.
        async with channel(self.address) as ch:
            stub = worker_pb2_grpc.WorkerStub(ch)
            info = await stub.Info(worker_pb2.InfoRequest(), timeout=max(1.0, self.stale_after))
            self.dispatcher.on_info(self.address, info)
            call = self._call = stub.WatchLoad(
                worker_pb2.WatchLoadRequest(watcher=self.watcher, interval_ms=self.interval_ms))
            loop = asyncio.get_running_loop()
            try:
                # One deadline moved on by each report (not a wait_for, which wraps every read in a task).
                async with asyncio.timeout(self.stale_after) as silence:
                    while True:
                        report = await call.read()
                        if report is grpc.aio.EOF:
                            return
                        silence.reschedule(loop.time() + self.stale_after)
                        self.dispatcher.on_report(self.address, report)
                        if not self._reported:
                            self._reported = True
                            self.attempted.set()
            finally:
                call.cancel()


class WorkerPool:
    """Every worker this scheduler watches."""

    def __init__(self, dispatcher: Dispatcher, *, static: Sequence[str] = (), dns: Sequence[str] = (),
                 dns_interval: float = 5.0, watcher: str = "scheduler", interval_ms: int = 200,
                 stale_after: float = 3.0) -> None:
        self.dispatcher = dispatcher
        self.static = list(dict.fromkeys(static))
        self.dns = list(dns)
        self.dns_interval = dns_interval
        self.watcher = watcher
        self.interval_ms = interval_ms
        self.stale_after = stale_after
        self.watches: dict[str, WorkerWatch] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._marks: set[asyncio.Task[None]] = set()
        dispatcher.versions.send_mark = self.send_mark

    def send_mark(self, address: str, mark: worker_pb2.RollbackMark) -> None:
        """Marks the worker's version rolled back (in the background: a failed call is retried by the next
        report that lacks the mark)."""
        async def send() -> None:
            try:
                async with channel(address) as ch:
                    await worker_pb2_grpc.WorkerStub(ch).MarkRollback(mark, timeout=max(1.0, self.stale_after))
            except grpc.RpcError as exc:
                logger.warning("marking worker %s rolled back failed: %s", address, exc.code().name)
        task = asyncio.get_running_loop().create_task(send())
        self._marks.add(task)
        task.add_done_callback(self._marks.discard)

    def _add(self, address: str) -> None:
        if address in self.watches:
            return
        watch = WorkerWatch(address, self.dispatcher, watcher=self.watcher, interval_ms=self.interval_ms,
                            stale_after=self.stale_after)
        self.watches[address] = watch
        watch.start()
        logger.info("watching worker %s", address)

    async def _remove(self, address: str) -> None:
        watch = self.watches.pop(address, None)
        if watch is not None:
            await watch.stop()
            self.dispatcher.remove(address)
            logger.info("stopped watching worker %s (no longer resolved)", address)

    async def resolve(self) -> set[str]:
        """The addresses the DNS names resolve to now (a name that fails resolves to nothing)."""
        loop = asyncio.get_running_loop()
        found: set[str] = set()
        for spec in self.dns:
            host, port = split_host_port(spec)
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                logger.warning("cannot resolve %s: %s", spec, exc)
                continue
            for family, *_, sockaddr in infos:
                ip = sockaddr[0]
                found.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        return found

    async def refresh(self) -> None:
        wanted = set(self.static) | await self.resolve()
        for address in sorted(wanted - set(self.watches)):
            self._add(address)
        for address in sorted(set(self.watches) - wanted):
            await self._remove(address)

    async def start(self) -> None:
        await self.refresh()
        self._tasks.append(asyncio.create_task(self._expire_loop(), name="lease expiry"))
        if self.dns:
            self._tasks.append(asyncio.create_task(self._dns_loop(), name="dns"))

    async def wait_first_attempts(self, timeout: float) -> None:
        """Returns once every known worker was tried once (or after `timeout`)."""
        events = [w.attempted.wait() for w in self.watches.values()]
        if events:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*events), timeout)

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self.dns_interval)
            try:
                await self.refresh()
            except Exception:
                logger.exception("refreshing the worker set failed")

    async def _expire_loop(self) -> None:
        # Wakes when the earliest unclaimed lease is due (at most the lease TTL, and 1 s, later, to
        # see leases granted meanwhile), not on a fixed short tick that would mostly find nothing.
        d = self.dispatcher
        while True:
            due = d.leases.next_expiry()
            cap = min(1.0, d.limits.lease_ttl)
            await asyncio.sleep(cap if due is None else min(cap, max(0.0, due - d.clock())))
            d.expire()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for watch in list(self.watches.values()):
            await watch.stop()
