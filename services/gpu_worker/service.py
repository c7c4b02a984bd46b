"""The Worker gRPC servicer: validates, admits, streams engine deltas (or embeds a batch), reports load."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from infermesh.common.context import current_request_id, deadline_of, seconds_left
from infermesh.common.errors import DeadlineExceeded, EngineDead, InfermeshError, InvalidRequest, NotFound, Unavailable
from infermesh.gpu_worker import metrics
from infermesh.gpu_worker.deadlines import DeadlineTimer
from infermesh.gpu_worker.engine import Delta, Engine
from infermesh.gpu_worker.load import LoadTracker
from infermesh.gpu_worker.validation import build_embed_request, build_request
from infermesh.v1 import common_pb2, worker_pb2, worker_pb2_grpc

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_MS = 100
MIN_INTERVAL_MS = 10


# How close to its deadline a cancelled call counts as ended by the deadline (see Generate).
CANCEL_SLACK = 0.1


class WorkerService(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: Engine, worker_id: str) -> None:
        self.engine = engine
        self.info = engine.info
        self.worker_id = worker_id
        self.tracker = LoadTracker(self.info.max_num_seqs, self.info.kv_capacity_tokens)
        self.ready = False
        self.ready_since = 0.0  # unix seconds: when the warm engine began to serve
        self.rollback = worker_pb2.RollbackMark()  # a scheduler's rollback of this version (empty: none)
        metrics.export_load(self.info.model, engine.load)
        metrics.precreate(self.info.model)

    def engine_started(self) -> None:
        """The engine knows its capacity only once it has started."""
        self.info = self.engine.info
        self.tracker.max_num_seqs = self.info.max_num_seqs
        self.tracker.kv_capacity_tokens = self.info.kv_capacity_tokens
        self.ready = True
        self.ready_since = time.time()
        self.tracker.wake_all()  # every scheduler hears of the window and capacity at once

    def _refuse(self, exc: InfermeshError) -> InfermeshError:
        metrics.REFUSED.labels(model_name=self.info.model, code=exc.code.name).inc()
        return exc

    def _check_serving(self, model: str, task: str) -> None:
        """Refuses a call this worker cannot take now (draining, starting, failed, another model or task)."""
        if self.tracker.draining:
            raise self._refuse(Unavailable("worker is draining; send the request elsewhere"))
        if not self.ready:
            raise self._refuse(Unavailable("the engine is starting"))
        if not self.engine.healthy():
            raise self._refuse(EngineDead("the engine has failed"))
        if model and model != self.info.model:
            raise self._refuse(NotFound(f"The model {model!r} does not exist (served: {self.info.model}).",
                                        param="model"))
        if task != self.info.task:
            does = "embeddings" if self.info.task == "embed" else "chat and completions"
            raise self._refuse(InvalidRequest(f"the model {self.info.model!r} serves {does} only", param="model"))

    def _deadline(self, ctx: common_pb2.RequestContext) -> tuple[float | None, float | None]:
        """The request's deadline (unix seconds) and the seconds left until it (None: none); refused when it
        passed before the request got here."""
        deadline = deadline_of(ctx)
        left = None if deadline is None else seconds_left(deadline)
        if left is not None and left <= 0:
            metrics.DEADLINE_EXCEEDED.labels(model_name=self.info.model).inc()
            raise self._refuse(DeadlineExceeded(f"the request's deadline passed {-left:.3g}s before it "
                                                "reached the worker"))
        return deadline, left

    async def Generate(self, request: worker_pb2.GenerateTokensRequest,
                       context: Any) -> AsyncIterator[worker_pb2.GenerateTokensResponse]:
        self._check_serving(request.model, "generate")
        caller_id = request.context.request_id or current_request_id()
        req = build_request(request, self.info, f"{caller_id}-{uuid.uuid4().hex[:8]}")
        self.engine.validate(req)
        deadline, left = self._deadline(request.context)
        try:
            held = self.tracker.hold(req, caller_id, request.lease_id)
        except InfermeshError as exc:
            raise self._refuse(exc) from None
        # However the call ends (a client that goes away included), the lease ends and the engine
        # stops at once, even before this generator is closed.
        context.add_done_callback(lambda _: self._ended(held.key))
        prompt_tokens = len(request.prompt_ids)
        observed = metrics.RequestMetrics(self.info.model, prompt_tokens)
        finish = "abort"
        stream = self.engine.generate(req)
        # The caller's deadline: one timer aborts the request in the engine when it passes.
        timer = None if left is None else DeadlineTimer(
            left, lambda: asyncio.ensure_future(self.engine.abort(held.key)), asyncio.current_task())
        expired = False
        outcome = worker_pb2.LeaseResult.OUTCOME_CANCELLED
        try:
            if req.structured is not None:
                # The constraint compiled: say so at once (the frontend commits a stream's HTTP status on it,
                # so that a constraint the engine refuses is a 400, never an error inside a 200 stream).
                yield worker_pb2.GenerateTokensResponse(index=0, prompt_tokens=prompt_tokens)
            async for delta in stream:
                observed.on_delta(delta)
                if delta.finish_reason:
                    finish = delta.finish_reason
                    if finish == "abort" and timer is not None and timer.expired:
                        expired = True
                        continue  # the deadline's abort: the call ends with DEADLINE_EXCEEDED instead
                yield _to_proto(delta, prompt_tokens)
            outcome = worker_pb2.LeaseResult.OUTCOME_TIMEOUT if expired else (
                worker_pb2.LeaseResult.OUTCOME_OK if finish != "abort" else worker_pb2.LeaseResult.OUTCOME_CANCELLED)
        except InfermeshError as exc:
            if exc.http_status >= 500:
                outcome = worker_pb2.LeaseResult.OUTCOME_FAILED
            raise
        except asyncio.CancelledError:
            if timer is None or not timer.forced:
                if deadline is not None and seconds_left(deadline) <= CANCEL_SLACK:
                    # The caller's gRPC deadline (the same one) cancelled the call first: count it all the same.
                    # Its cancellation may reach us a hair before our clock reads the deadline (the caller
                    # turned the deadline into a timeout earlier): a call cancelled that close is its deadline.
                    metrics.DEADLINE_EXCEEDED.labels(model_name=self.info.model).inc()
                    outcome = worker_pb2.LeaseResult.OUTCOME_TIMEOUT
                raise
            # The engine did not end the stream after the deadline's abort: the timer cancelled us.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            expired, finish = True, "abort"
            outcome = worker_pb2.LeaseResult.OUTCOME_TIMEOUT
        except Exception:
            outcome = worker_pb2.LeaseResult.OUTCOME_FAILED
            raise
        finally:
            if timer is not None:
                timer.cancel()
            await stream.aclose()
            self.tracker.release(held, observed.result(request.lease_id, outcome))
            observed.on_finish(finish)
        if expired:
            metrics.DEADLINE_EXCEEDED.labels(model_name=self.info.model).inc()
            raise DeadlineExceeded("the request's deadline passed while it was generating; aborted in the engine")

    async def Embed(self, request: worker_pb2.EmbedTokensRequest, context: Any) -> worker_pb2.EmbedTokensResponse:
        self._check_serving(request.model, "embed")
        caller_id = request.context.request_id or current_request_id()
        req = build_embed_request(request, self.info, f"{caller_id}-{uuid.uuid4().hex[:8]}")
        _, left = self._deadline(request.context)
        try:
            held = self.tracker.hold_embed(req, caller_id, request.lease_id)
        except InfermeshError as exc:
            raise self._refuse(exc) from None
        observed = metrics.RequestMetrics(self.info.model, req.tokens)
        finish = "abort"
        try:
            # A cancelled call (the caller went away, or its gRPC deadline) cancels this task, and with it
            # the engine's requests; the request's own deadline does the same through the timeout.
            async with asyncio.timeout(left):
                vectors = await self.engine.embed(req)
            finish = "stop"
        except TimeoutError:
            metrics.DEADLINE_EXCEEDED.labels(model_name=self.info.model).inc()
            raise DeadlineExceeded("the request's deadline passed while it was embedding; aborted in the engine") \
                from None
        finally:
            self.tracker.release(held)
            observed.on_finish(finish)
        return worker_pb2.EmbedTokensResponse(
            embeddings=[worker_pb2.EmbeddingVector(values=v) for v in vectors], prompt_tokens=req.tokens)

    def _ended(self, key: str) -> None:
        held = self.tracker.held.get(key)
        if held is not None:
            self.tracker.release(held)
            asyncio.ensure_future(self.engine.abort(key))

    async def Abort(self, request: worker_pb2.AbortRequest, context: Any) -> worker_pb2.AbortResponse:
        found = False
        for key in self.tracker.keys_for(request.request_id):
            found = await self.engine.abort(key) or found
        return worker_pb2.AbortResponse(found=found)

    async def MarkRollback(self, request: worker_pb2.RollbackMark, context: Any) -> worker_pb2.RollbackMark:
        if request.fingerprint != self.rollback.fingerprint:
            logger.warning("a scheduler marked this version (%s) rolled back: %s", self.info.model,
                           request.reason or "cleared")
        self.rollback.CopyFrom(request)
        self.tracker.wake_all()  # every scheduler hears of it in its next report, at once
        return self.rollback

    async def Info(self, request: worker_pb2.InfoRequest, context: Any) -> worker_pb2.WorkerInfo:
        i = self.info
        return worker_pb2.WorkerInfo(worker_id=self.worker_id, model=i.model, max_model_len=i.max_model_len,
                                     engine=i.engine, simulated=i.simulated, max_num_seqs=i.max_num_seqs,
                                     kv_capacity_tokens=i.kv_capacity_tokens, block_size=i.block_size,
                                     version=i.version, task=i.task, embedding_dim=i.embedding_dim)

    def report(self, started: list[str], finished: list[str],
               results: Sequence[worker_pb2.LeaseResult] = ()) -> worker_pb2.LoadReport:
        load = self.engine.load()
        t = self.tracker
        return worker_pb2.LoadReport(
            worker_id=self.worker_id, model=self.info.model, seq=next(t.seq), running=load.running,
            waiting=load.waiting, kv_cache_usage=load.kv_cache_usage,
            kv_capacity_tokens=self.info.kv_capacity_tokens, max_num_seqs=self.info.max_num_seqs,
            committed_tokens=t.committed_tokens, prefix_cache_hit_rate=load.prefix_cache_hit_rate,
            draining=t.draining, leases_started=started, leases_finished=finished,
            leases_active=t.leases_active(), max_model_len=self.info.max_model_len, block_size=self.info.block_size,
            embedding_dim=self.info.embedding_dim, results=results, ready_since=self.ready_since,
            rollback=self.rollback if self.rollback.fingerprint else None)

    async def WatchLoad(self, request: worker_pb2.WatchLoadRequest,
                        context: Any) -> AsyncIterator[worker_pb2.LoadReport]:
        interval = max(MIN_INTERVAL_MS, request.interval_ms or DEFAULT_INTERVAL_MS) / 1000
        watcher = self.tracker.watch()
        logger.info("load watcher %r connected", request.watcher)
        try:
            while True:
                started, finished, results = watcher.started, watcher.finished, watcher.results
                watcher.started, watcher.finished, watcher.results = [], [], []
                watcher.wake.clear()
                yield self.report(started, finished, results)
                if self.tracker.closing:
                    return
                try:
                    await asyncio.wait_for(watcher.wake.wait(), timeout=interval)
                except TimeoutError:
                    pass
        finally:
            self.tracker.unwatch(watcher)
            logger.info("load watcher %r gone", request.watcher)

    async def drain(self) -> None:
        """SIGTERM: refuse new work, report draining, wait for in-flight streams, end load streams."""
        self.tracker.draining = True
        self.tracker.wake_all()
        logger.info("draining: %d requests in flight", len(self.tracker.held))
        try:
            await self.tracker.wait_idle()
        finally:
            self.tracker.closing = True
            self.tracker.wake_all()


def _to_proto(delta: Delta, prompt_tokens: int) -> worker_pb2.GenerateTokensResponse:
    msg = worker_pb2.GenerateTokensResponse(index=delta.index, token_ids=delta.token_ids,
                                            finish_reason=delta.finish_reason or "",
                                            prompt_tokens=prompt_tokens,
                                            cached_tokens=min(delta.cached_tokens, prompt_tokens))
    if delta.stop_token_id is not None:
        msg.stop_token_id = delta.stop_token_id
    if delta.logprobs:
        msg.logprobs.extend(
            common_pb2.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                                    top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])
            for lp in delta.logprobs)
    return msg
