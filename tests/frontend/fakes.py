"""In-process fakes of the tiers behind the frontend's request path (`RequestBackends`).

`FakeBackends` renders with the default model's real tokenizer, answers Admit
from a script of leases and refusals, and serves each worker address from a
script of `FakeCall`s: token-id messages, errors raised at a given point, or a
pause that waits until the test lets it go. Everything the request path asks
for (admit requests, worker requests, releases, cancellations) is recorded.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from infermesh.common.errors import InfermeshError, to_status
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.interfaces import ModelFacts
from infermesh.v1 import scheduler_pb2, tokenizer_pb2, worker_pb2
from tokenizers import Tokenizer


def rpc_error(exc: InfermeshError) -> grpc.aio.AioRpcError:
    """The error a grpc.aio call raises when the other side answered with `exc`."""
    code, details, trailers = to_status(exc)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


@dataclass
class Pause:
    """A point in a worker's stream where it waits until `release.set()`."""

    release: asyncio.Event = field(default_factory=asyncio.Event)
    reached: asyncio.Event = field(default_factory=asyncio.Event)


Step = worker_pb2.GenerateTokensResponse | BaseException | Pause


class FakeCall:
    """A worker's Generate stream playing `steps`; records whether it was cancelled."""

    def __init__(self, request: worker_pb2.GenerateTokensRequest, steps: Sequence[Step]) -> None:
        self.request = request
        self.steps = deque(steps)
        self._cancelled = False
        self._wake = asyncio.Event()

    async def read(self) -> Any:
        if self._cancelled:
            raise rpc_error_cancelled()
        if not self.steps:
            return grpc.aio.EOF
        step = self.steps.popleft()
        if isinstance(step, Pause):
            step.reached.set()
            waiter = asyncio.ensure_future(step.release.wait())
            cancel = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait((waiter, cancel), return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiter.cancel()
                cancel.cancel()
            return await self.read()
        if isinstance(step, BaseException):
            raise step
        await asyncio.sleep(0)
        return step

    def cancel(self) -> bool:
        if self._cancelled or not self.steps:
            return False
        self._cancelled = True
        self._wake.set()
        return True

    def cancelled(self) -> bool:
        return self._cancelled


def rpc_error_cancelled() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), "cancelled")


def tokens(ids: Sequence[int], index: int = 0, finish: str = "", cached: int = 0) -> worker_pb2.GenerateTokensResponse:
    return worker_pb2.GenerateTokensResponse(index=index, token_ids=list(ids), finish_reason=finish,
                                             cached_tokens=cached)


@functools.lru_cache(maxsize=4)
def _tokenizers(model_dir: Path, model: str) -> tuple[TokenizerModel, Tokenizer]:
    raw = (model_dir / "tokenizer.json").read_bytes()
    return TokenizerModel(model, raw, [2]), Tokenizer.from_str(raw.decode())


class FakeBackends:
    """The request path's backends, in-process (see the module docstring)."""

    def __init__(self, model_dir: Path, *, model: str = "m", window: int = 4096, block_size: int = 16) -> None:
        self.tokenizer, self.encoder = _tokenizers(model_dir, model)
        self.facts: dict[str, ModelFacts] = {model: ModelFacts(model, window, block_size)}
        self.render_error: InfermeshError | None = None
        # Admit answers, in order: a worker address to lease, or an error to raise.
        self.admissions: deque[str | InfermeshError] = deque()
        self.workers: dict[str, deque[list[Step]]] = {}  # address -> the scripts of its next calls
        self.admitted: list[scheduler_pb2.AdmitRequest] = []
        self.admit_timeouts: list[float | None] = []
        self.calls: list[tuple[str, FakeCall]] = []
        self.released: list[tuple[str, int]] = []
        self._leases = itertools.count(1)

    def encode(self, text: str) -> list[int]:
        return list(self.encoder.encode(text, add_special_tokens=False).ids)

    def script(self, address: str, *steps: Step) -> None:
        self.workers.setdefault(address, deque()).append(list(steps))

    async def tokenizer_model(self, model: str) -> TokenizerModel:
        return self.tokenizer

    async def render(self, request: tokenizer_pb2.RenderRequest) -> tokenizer_pb2.RenderResponse:
        if self.render_error is not None:
            raise self.render_error
        text = request.prompt if request.HasField("prompt") else " ".join(m.content for m in request.messages)
        return tokenizer_pb2.RenderResponse(token_ids=self.encode(text))

    async def model_facts(self, model: str) -> ModelFacts | None:
        return self.facts.get(model)

    async def admit(self, request: scheduler_pb2.AdmitRequest, timeout: float | None) -> scheduler_pb2.Lease:
        self.admitted.append(request)
        self.admit_timeouts.append(timeout)
        answer = self.admissions.popleft()
        if isinstance(answer, InfermeshError):
            raise answer
        return scheduler_pb2.Lease(lease_id=f"lease-{next(self._leases)}", worker_id=answer, worker_address=answer)

    def release(self, lease_id: str, outcome: int) -> None:
        self.released.append((lease_id, outcome))

    def generate(self, address: str, request: worker_pb2.GenerateTokensRequest,
                 metadata: Sequence[tuple[str, str]], timeout: float | None) -> FakeCall:
        call = FakeCall(request, self.workers[address].popleft())
        self.calls.append((address, call))
        return call
