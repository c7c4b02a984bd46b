"""The frontend's clients of the tokenizer, scheduler and workers (the request path's `RequestBackends`
over gRPC), the per-model tokenizer cache, and the model cards the workers report."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
from infermesh.common.channels import channel
from infermesh.common.context import request_metadata
from infermesh.common.errors import InfermeshError, NotFound, Unavailable, from_rpc_error
from infermesh.common.server import CHANNEL_OPTIONS
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.interfaces import ModelFacts, WorkerCall
from infermesh.v1 import (
    common_pb2,
    scheduler_pb2,
    scheduler_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
    worker_pb2,
    worker_pb2_grpc,
)

logger = logging.getLogger(__name__)

# Timeouts of the unary calls (Admit waits in the queue: bounded by the scheduler).
RENDER_TIMEOUT = 30.0
CONTROL_TIMEOUT = 5.0
MODELS_TTL = 2.0
MISSING_MODEL_TTL = 0.5  # a model no worker served is looked up again at most this often


def rpc_error(err: grpc.RpcError, tier: str) -> InfermeshError:
    """The project's error for a failed call; an unreachable tier is a 503 that names it."""
    exc = from_rpc_error(err)
    if isinstance(exc, Unavailable):
        return Unavailable(f"the {tier} is unavailable: {exc.message}")
    return exc


class Backends:
    """Channels to the tiers the frontend calls, shared by all requests."""

    def __init__(self, tokenizer_address: str, scheduler_address: str) -> None:
        # Channels without interceptors (a client interceptor costs a task per call): each call
        # passes the request id as metadata itself.
        self.tokenizer_channel = channel(tokenizer_address)
        self.scheduler_channel = channel(scheduler_address)
        self.tokenizer = tokenizer_pb2_grpc.TokenizerStub(self.tokenizer_channel)
        self.scheduler = scheduler_pb2_grpc.SchedulerStub(self.scheduler_channel)
        self._workers: dict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = {}
        self._models: dict[str, TokenizerModel] = {}
        self._model_locks: dict[str, asyncio.Lock] = {}
        self._cards: tuple[float, list[common_pb2.ModelCard]] | None = None
        self._facts: dict[str, ModelFacts] = {}
        self._refreshing: asyncio.Task[Any] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    def worker(self, address: str) -> worker_pb2_grpc.WorkerStub:
        entry = self._workers.get(address)
        if entry is None:
            # No interceptors on the token path (they cost a task per streamed message); the caller
            # passes the request id as metadata itself.
            ch = channel(address, CHANNEL_OPTIONS)
            entry = (ch, worker_pb2_grpc.WorkerStub(ch))
            self._workers[address] = entry
        return entry[1]

    def generate(self, address: str, request: worker_pb2.GenerateTokensRequest,
                 metadata: Sequence[tuple[str, str]], timeout: float | None) -> WorkerCall:
        call: WorkerCall = self.worker(address).Generate(request, metadata=metadata, timeout=timeout)
        return call

    async def tokenizer_model(self, model: str) -> TokenizerModel:
        """The model's decoding tokenizer, fetched once from the tokenizer service."""
        cached = self._models.get(model)
        if cached is not None:
            return cached
        lock = self._model_locks.setdefault(model, asyncio.Lock())
        async with lock:
            if model in self._models:
                return self._models[model]
            try:
                definition = await self.tokenizer.GetTokenizer(
                    tokenizer_pb2.GetTokenizerRequest(model=model), timeout=RENDER_TIMEOUT,
                    metadata=request_metadata())
            except grpc.RpcError as err:
                raise rpc_error(err, "tokenizer") from None
            built = await asyncio.to_thread(
                TokenizerModel, definition.model, definition.tokenizer_json, list(definition.eos_token_ids))
            self._models[model] = built
            logger.info("loaded the tokenizer of %s (vocabulary %d)", model, built.vocab_size)
            return built

    async def render(self, request: tokenizer_pb2.RenderRequest) -> tokenizer_pb2.RenderResponse:
        try:
            reply: tokenizer_pb2.RenderResponse = await self.tokenizer.Render(
                request, timeout=RENDER_TIMEOUT, metadata=request_metadata(request.context.request_id))
            return reply
        except grpc.RpcError as err:
            raise rpc_error(err, "tokenizer") from None

    async def admit(self, request: scheduler_pb2.AdmitRequest, timeout: float | None) -> scheduler_pb2.Lease:
        try:
            lease: scheduler_pb2.Lease = await self.scheduler.Admit(
                request, timeout=timeout, metadata=request_metadata(request.context.request_id))
            return lease
        except grpc.RpcError as err:
            exc = rpc_error(err, "scheduler")
            if isinstance(exc, NotFound):
                # The tokenizer knows the model (it rendered the prompt): no worker serving it is an outage.
                raise Unavailable(exc.message) from None
            raise exc from None

    def release(self, lease_id: str, outcome: int) -> None:
        """Ends a lease in the background (also from a cancelled task)."""
        metadata = request_metadata()
        request = scheduler_pb2.ReleaseRequest(lease_id=lease_id, outcome=scheduler_pb2.LeaseOutcome.ValueType(outcome))

        async def call() -> None:
            try:
                await self.scheduler.Release(request,
                                             timeout=CONTROL_TIMEOUT, metadata=metadata)
            except grpc.RpcError as err:
                logger.warning("release of lease %s failed: %s", lease_id, err.code().name)
        task = asyncio.get_running_loop().create_task(call())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def model_cards(self, fresh: bool = False) -> list[common_pb2.ModelCard]:
        """The models the scheduler's workers serve (cached briefly)."""
        now = time.monotonic()
        if not fresh and self._cards is not None and now - self._cards[0] < MODELS_TTL:
            return self._cards[1]
        try:
            reply = await self.scheduler.ListModels(common_pb2.ListModelsRequest(), timeout=CONTROL_TIMEOUT,
                                                    metadata=request_metadata())
        except grpc.RpcError as err:
            raise rpc_error(err, "scheduler") from None
        cards = list(reply.models)
        self._cards = (now, cards)
        self._facts = {c.id: ModelFacts(c.id, c.max_model_len, c.block_size) for c in cards}
        return cards

    async def model_facts(self, model: str) -> ModelFacts | None:
        """The window and block size the model's workers report; None when no worker serves it.

        Served from the cached cards; stale cards are refreshed in the background (one call at a
        time), and a model not among them is looked up again soon (its first worker may be new).
        """
        facts = self._facts.get(model)
        if facts is None or not facts.max_model_len:  # not served, or its engines still starting
            if self._cards is None or time.monotonic() - self._cards[0] >= MISSING_MODEL_TTL:
                await self.model_cards(fresh=True)
            return self._facts.get(model)
        if self._cards is not None and time.monotonic() - self._cards[0] >= MODELS_TTL and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        return facts

    async def _refresh(self) -> None:
        try:
            await self.model_cards(fresh=True)
        except InfermeshError as exc:
            logger.warning("refreshing the model cards failed: %s", exc.message)
        finally:
            self._refreshing = None

    async def health(self) -> tuple[bool, dict[str, str]]:
        """Whether a request can be served: tokenizer, scheduler and a ready worker."""
        checks: dict[str, str] = {}
        try:
            await self.tokenizer.ListModels(common_pb2.ListModelsRequest(), timeout=CONTROL_TIMEOUT,
                                            metadata=request_metadata())
            checks["tokenizer"] = "ok"
        except grpc.RpcError as err:
            checks["tokenizer"] = err.code().name
        try:
            reply = await self.scheduler.ListWorkers(scheduler_pb2.ListWorkersRequest(), timeout=CONTROL_TIMEOUT,
                                                     metadata=request_metadata())
            ready = sum(1 for w in reply.workers if w.state == scheduler_pb2.WORKER_STATE_READY)
            checks["scheduler"] = "ok"
            checks["ready_workers"] = str(ready)
        except grpc.RpcError as err:
            checks["scheduler"] = err.code().name
            ready = 0
        ok = checks["tokenizer"] == "ok" and checks["scheduler"] == "ok" and ready > 0
        return ok, checks

    async def close(self) -> None:
        if self._refreshing is not None:
            await asyncio.wait({self._refreshing}, timeout=CONTROL_TIMEOUT)
        for task in list(self._background):
            await asyncio.wait({task}, timeout=CONTROL_TIMEOUT)
        await self.tokenizer_channel.close()
        await self.scheduler_channel.close()
        for ch, _ in self._workers.values():
            await ch.close()

    async def encode(self, request: tokenizer_pb2.EncodeRequest, request_id: str) -> tokenizer_pb2.EncodeResponse:
        """Token ids of texts, in one batch (the embeddings' inputs)."""
        try:
            reply: tokenizer_pb2.EncodeResponse = await self.tokenizer.Encode(
                request, timeout=RENDER_TIMEOUT, metadata=request_metadata(request_id))
            return reply
        except grpc.RpcError as err:
            raise rpc_error(err, "tokenizer") from None

    async def embed(self, address: str, request: worker_pb2.EmbedTokensRequest,
                    metadata: Sequence[tuple[str, str]], timeout: float | None) -> worker_pb2.EmbedTokensResponse:
        """A worker's Embed; a failure is the grpc.RpcError itself (the caller decides whether to retry it)."""
        reply: worker_pb2.EmbedTokensResponse = await self.worker(address).Embed(request, metadata=metadata,
                                                                                timeout=timeout)
        return reply
