"""The Scheduler gRPC servicer: decodes requests, calls the Dispatcher, encodes replies."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from infermesh.common.context import deadline_of, seconds_left
from infermesh.common.errors import InvalidRequest
from infermesh.scheduler.admission import Ticket
from infermesh.scheduler.capacity import State
from infermesh.scheduler.dispatcher import Dispatcher
from infermesh.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

_MAX_TOKENS = 1 << 24


def caller_timeout(request: scheduler_pb2.AdmitRequest, context: Any) -> float | None:
    """Seconds left before the caller's deadline (RequestContext.deadline or the gRPC deadline)."""
    left = []
    deadline = deadline_of(request.context)
    if deadline is not None:
        left.append(seconds_left(deadline))
    remaining = context.time_remaining() if context is not None else None
    if remaining is not None:
        left.append(remaining - 0.005)  # answer before the transport gives up
    return min(left) if left else None


def ticket_from(request: scheduler_pb2.AdmitRequest, task: str = "generate") -> Ticket:
    """The ticket of an Admit. For an embed model (`task`), the request is a batch of inputs: max_tokens 0,
    one sequence, prompt_tokens their tokens together (each input's window was checked by the frontend and
    is checked again by the worker: their sum is no one sequence's length)."""
    if request.prompt_tokens == 0:
        raise InvalidRequest("prompt_tokens must be at least 1", param="prompt_tokens")
    n = request.n or 1
    embed = task == "embed"
    if embed and (request.max_tokens or n != 1):
        raise InvalidRequest(f"the model {request.model!r} serves embeddings only: max_tokens must be 0 and n 1",
                             param="model")
    tokens = request.prompt_tokens + n * request.max_tokens  # what the worker commits
    if tokens > _MAX_TOKENS:
        raise InvalidRequest("prompt_tokens plus n * max_tokens is implausibly large", param="max_tokens")
    length = 1 if embed else request.prompt_tokens + request.max_tokens
    return Ticket(model=request.model, tokens=tokens, seqs=n, length=length,
                  tenant=request.context.tenant, priority=request.context.priority,
                  prefix_hashes=request.prefix_hashes, constraint_hash=request.constraint_hash,
                  exclude=frozenset(request.exclude_workers),
                  request_id=request.context.request_id, version_pinned=request.version_pinned)


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        self.created = int(time.time())

    async def Admit(self, request: scheduler_pb2.AdmitRequest, context: Any) -> scheduler_pb2.Lease:
        model = self.dispatcher.models.get(request.model)
        ticket = ticket_from(request, model.task if model is not None else "generate")
        grant = await self.dispatcher.admit(ticket, caller_timeout(request, context))
        lease = grant.lease
        expires = Timestamp()
        expires.FromNanoseconds(int((time.time() + lease.expires_at - self.dispatcher.clock()) * 1e9))
        return scheduler_pb2.Lease(lease_id=lease.lease_id, worker_id=lease.worker_id,
                                   worker_address=lease.address, expires_at=expires,
                                   queue_ms=round(grant.queue_seconds * 1000))

    async def Release(self, request: scheduler_pb2.ReleaseRequest, context: Any) -> scheduler_pb2.ReleaseResponse:
        if not request.lease_id:
            raise InvalidRequest("lease_id is required", param="lease_id")
        how = "worker_failed" if request.outcome == scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED else "released"
        return scheduler_pb2.ReleaseResponse(found=self.dispatcher.release(request.lease_id, how))

    async def ListWorkers(self, request: scheduler_pb2.ListWorkersRequest,
                          context: Any) -> scheduler_pb2.ListWorkersResponse:
        out = []
        for w in sorted(self.dispatcher.workers.values(), key=lambda w: w.address):
            state = scheduler_pb2.WorkerState.ValueType(w.state)
            status = scheduler_pb2.WorkerStatus(worker_id=w.worker_id, address=w.address, state=state,
                                                model=w.model, pending_leases=len(w.pending))
            if w.report is not None:
                status.load.CopyFrom(w.report)
            out.append(status)
        return scheduler_pb2.ListWorkersResponse(workers=out)

    async def ListModels(self, request: common_pb2.ListModelsRequest, context: Any) -> common_pb2.ListModelsResponse:
        served = {w.model for w in self.dispatcher.workers.values()
                  if w.model and w.state in (State.READY, State.DRAINING)}
        models = [self.dispatcher.models[name] for name in sorted(served) if name in self.dispatcher.models]
        return common_pb2.ListModelsResponse(models=[
            common_pb2.ModelCard(id=m.name, max_model_len=m.max_model_len, simulated=m.simulated,
                                 owned_by="infermesh", created=self.created, block_size=m.block_size,
                                 task=m.task, embedding_dim=m.embedding_dim)
            for m in models])

    async def WatchVersions(self, request: scheduler_pb2.WatchVersionsRequest,
                            context: Any) -> AsyncIterator[scheduler_pb2.VersionSplits]:
        async for splits in self.dispatcher.versions.watch():
            yield splits
