"""What the request path needs of the other tiers: the interface `infermesh.frontend.backends.Backends`
implements over gRPC and the unit tests fake in-process.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.v1 import common_pb2, scheduler_pb2, tokenizer_pb2, worker_pb2


class CallerContext:
    """What a request carries of its caller (its id, tenant, priority and deadline), as every call it makes
    passes it on; a base of the request path's request dataclasses (a plain class: it adds no fields)."""

    request_id: str
    tenant: str
    priority: int
    deadline: float | None  # unix seconds

    def time_left(self) -> float | None:
        """Seconds until the deadline (None: none)."""
        return None if self.deadline is None else self.deadline - time.time()

    def context(self) -> common_pb2.RequestContext:
        ctx = common_pb2.RequestContext(request_id=self.request_id, tenant=self.tenant,
                                       priority=common_pb2.Priority.ValueType(self.priority))
        if self.deadline is not None:
            ctx.deadline.FromNanoseconds(int(self.deadline * 1e9))
        return ctx


@dataclass(frozen=True)
class ModelFacts:
    """What the model's workers report about it (through the scheduler): the context window and
    the KV block size; the one source of both for the whole request path."""

    name: str
    max_model_len: int
    block_size: int


class WorkerCall(Protocol):
    """A worker's Generate stream, as grpc.aio gives it."""

    async def read(self) -> Any: ...  # a GenerateTokensResponse, or grpc.aio.EOF

    def cancel(self) -> bool: ...

    def cancelled(self) -> bool: ...


class RequestBackends(Protocol):
    async def tokenizer_model(self, model: str) -> TokenizerModel: ...

    async def render(self, request: tokenizer_pb2.RenderRequest) -> tokenizer_pb2.RenderResponse: ...

    async def model_facts(self, model: str) -> ModelFacts | None:
        """None when no worker serves the model now."""
        ...

    async def admit(self, request: scheduler_pb2.AdmitRequest, timeout: float | None) -> scheduler_pb2.Lease: ...

    def release(self, lease_id: str, outcome: int) -> None:
        """Ends a lease in the background (callable from a cancelled task)."""
        ...

    def generate(self, address: str, request: worker_pb2.GenerateTokensRequest,
                 metadata: Sequence[tuple[str, str]], timeout: float | None) -> WorkerCall: ...
