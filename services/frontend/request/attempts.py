"""Admission and attempts: lease, worker call, release, exclusion, and migration after a worker fails.

`Attempts` runs one request's worker calls in background tasks and writes what
they stream into the request's `OutputBuffer`. Each attempt asks the scheduler
for a lease (excluding the workers that already failed this request), calls
the leased worker, and ends the lease however the call ends.

A worker error that the error table marks `retry_elsewhere` (a refusal at
capacity, a worker that dies or drains mid-stream) excludes that worker and
starts another attempt; the new worker continues from the prompt plus the
tokens already produced, so the reader sees one unbroken stream. Choices of an
`n > 1` request that fail after some tokens each resume as a call of their own.
Anything else (a bad request, the deadline) fails the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc
from infermesh.common.context import request_metadata
from infermesh.common.errors import (
    Cancelled,
    DeadlineExceeded,
    InfermeshError,
    InternalError,
    Unavailable,
    from_rpc_error,
)
from infermesh.frontend import metrics
from infermesh.frontend.request.interfaces import RequestBackends
from infermesh.frontend.request.output import OutputBuffer
from infermesh.frontend.request.prepare import PreparedRequest
from infermesh.v1 import common_pb2, scheduler_pb2, worker_pb2

logger = logging.getLogger(__name__)

# Worker failures after which a request gives up (each excludes one more worker).
MAX_ATTEMPTS = 4


class WorkerFailed(Exception):
    """A worker call that another worker may complete (the error table says `retry_elsewhere`)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a gRPC code name, for the retries metric


class Attempts:
    def __init__(self, backends: RequestBackends, prepared: PreparedRequest, output: OutputBuffer,
                 on_error: Callable[[InfermeshError], bool] | None = None) -> None:
        self.backends = backends
        self.prepared = prepared
        self.output = output
        # Hears an error that ends the request before it fails the output; True: it took the request on
        # (the next model of a fallback chain), and the output stays open.
        self.on_error = on_error
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> Attempts:
        self._spawn(list(range(self.prepared.n)), [])
        return self

    async def close(self) -> None:
        """Cancels whatever still runs (the client went away, or the request ended)."""
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, indices: list[int], generated: list[int]) -> None:
        task = asyncio.get_running_loop().create_task(self._call(indices, generated))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call(self, indices: list[int], generated: list[int]) -> None:
        try:
            await self._run(indices, generated)
        except InfermeshError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("generation failed")
            self._fail(InternalError(f"generation failed: {type(exc).__name__}"))

    def _fail(self, exc: InfermeshError) -> None:
        if self.on_error is None or not self.on_error(exc):
            self.output.fail(exc)

    def _admit_request(self, exclude: list[str], generated: int, max_tokens: int, n: int) -> scheduler_pb2.AdmitRequest:
        p = self.prepared
        return scheduler_pb2.AdmitRequest(context=p.context(), model=p.model,
                                          prompt_tokens=len(p.prompt_ids) + generated, max_tokens=max_tokens,
                                          prefix_hashes=p.prefix_hashes, exclude_workers=exclude, n=n,
                                          constraint_hash=p.constraint_hash, version_pinned=p.version_pinned)

    def _admit_timeout(self) -> float | None:
        p = self.prepared
        left = p.time_left()
        if left is not None and left <= 0:
            raise DeadlineExceeded("the request's deadline passed before it was admitted")
        bounds = [t for t in (p.admit_timeout, left) if t is not None]
        return min(bounds) if bounds else None

    async def _run(self, indices: list[int], generated: list[int]) -> None:
        p = self.prepared
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(p.sampling)
        sampling.n = len(indices)
        exclude: list[str] = []
        output = self.output
        for attempt in range(1, MAX_ATTEMPTS + 1):
            remaining = max(1, sampling.max_tokens - len(generated))
            lease = await self.backends.admit(self._admit_request(exclude, len(generated), remaining, len(indices)),
                                              self._admit_timeout())
            if not p.constrained:
                output.admitted()  # a constrained request is decided by its worker's acknowledgement instead
            try:
                await self._stream(lease, indices, generated, sampling)
                return
            except WorkerFailed as failure:
                exclude = list(dict.fromkeys([*exclude, *(x for x in (lease.worker_id, lease.worker_address) if x)]))
                logger.warning("worker %s failed the request (%s: %s), attempt %d",
                               lease.worker_id or lease.worker_address, failure.reason, failure, attempt)
                metrics.RETRIES.labels(reason=failure.reason).inc()
                unfinished = [i for i in indices if not output.finished(i)]
                if not unfinished:
                    return
                if len(unfinished) > 1 and any(output.choices[i].ids for i in unfinished):
                    # Each choice resumes from its own tokens, as a call of its own.
                    for i in unfinished:
                        self._spawn([i], list(output.choices[i].ids))
                    return
                indices = unfinished
                sampling.n = len(indices)
                generated = list(output.choices[indices[0]].ids) if len(indices) == 1 else []
        raise Unavailable(f"no worker could complete the request after {MAX_ATTEMPTS} attempts")

    async def _stream(self, lease: scheduler_pb2.Lease, indices: list[int], generated: list[int],
                      sampling: common_pb2.SamplingParams) -> None:
        """One worker call; WorkerFailed when another worker should take over."""
        p = self.prepared
        request = worker_pb2.GenerateTokensRequest(context=p.context(), model=p.model, lease_id=lease.lease_id,
                                                   prompt_ids=p.prompt_ids, generated_ids=generated,
                                                   sampling=sampling)
        call = self.backends.generate(lease.worker_address, request, request_metadata(p.request_id), p.time_left())
        received = False
        output = self.output
        read = call.read
        release = self.backends.release
        try:
            while (msg := await read()) is not grpc.aio.EOF:  # read() skips an async generator per message
                if not received:
                    received = True
                    output.admitted()
                if msg.index >= len(indices):
                    raise WorkerFailed("INTERNAL", f"choice index {msg.index} out of range")
                if msg.finish_reason == "abort":
                    raise WorkerFailed("ABORTED", "the worker aborted the request")
                if msg.cached_tokens and not output.cached_tokens:
                    output.cached_tokens = msg.cached_tokens
                output.feed(indices[msg.index], msg.token_ids, msg.logprobs, msg.finish_reason)
                if all(output.finished(i) for i in indices):
                    return  # stop strings may end every choice early: `finally` frees the engine
            if not all(output.finished(i) for i in indices):
                raise WorkerFailed("UNAVAILABLE", "the stream ended before the choices finished")
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.CANCELLED and call.cancelled() and not received:
                release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
                raise Cancelled("cancelled") from None
            exc = from_rpc_error(err)
            if exc.retry_elsewhere:
                release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)
                raise WorkerFailed(exc.grpc_code.name, exc.message) from None
            # Refused for the request itself (a bad request, its deadline): not the worker's failure.
            release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
            raise exc from None
        except WorkerFailed:
            release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)
            raise
        except asyncio.CancelledError:
            if not received:
                release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
            raise
        finally:
            call.cancel()  # however this ends, the worker stops generating for it (no-op when done)
