"""The request path after rendering: admission, the worker's token stream, retries and migration.

A `Generation` runs one request's worker calls in background tasks. Each
message from a worker is detokenized and stop-matched at once and appended to
its choice's pending output; the reader (SSE, gRPC or a whole response) takes
everything pending whenever it is ready. A slow client therefore gets fewer,
larger chunks, and memory is bounded by the request's own output.

A worker that refuses before any token (RESOURCE_EXHAUSTED, UNAVAILABLE) or dies
mid-stream is excluded and the scheduler is asked for another lease; the new
worker continues from the prompt plus the tokens already produced, so the
reader sees one unbroken stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from infermesh.common.context import request_metadata
from infermesh.common.errors import Cancelled, InfermeshError, Unavailable, from_rpc_error
from infermesh.common.prefix import block_hashes
from infermesh.frontend import metrics
from infermesh.frontend.backends import Backends
from infermesh.frontend.detokenizer import Detokenizer, TokenizerModel
from infermesh.frontend.stop import StopMatcher
from infermesh.v1 import common_pb2, scheduler_pb2, worker_pb2

logger = logging.getLogger(__name__)

_TIMER = object()  # marks a wake-up by a waiting reader's timeout, not by news

# Worker failures after which a request gives up (each excludes one more worker).
MAX_ATTEMPTS = 4
_RETRY_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE,
                          grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.CANCELLED,
                          grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


@dataclass
class GenerationInput:
    """Everything the worker side of a request needs."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams  # max_tokens set to the rendered budget
    stops: list[str]
    tokenizer: TokenizerModel
    tenant: str = ""
    priority: int = 0
    deadline: float | None = None  # unix seconds
    admit_timeout: float | None = None


@dataclass
class Choice:
    """One choice's progress; `pending_*` is what the reader has not taken yet."""

    index: int
    detokenizer: Detokenizer
    stop: StopMatcher
    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    finish_reason: str = ""
    pending_text: list[str] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)
    reported: bool = False  # the finish was handed to the reader


@dataclass
class Delta:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]
    finish_reason: str


class _WorkerFailed(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Generation:
    def __init__(self, backends: Backends, inp: GenerationInput) -> None:
        self.backends = backends
        self.inp = inp
        n = inp.sampling.n or 1
        self.choices = [Choice(i, inp.tokenizer.detokenizer(), StopMatcher(inp.stops)) for i in range(n)]
        self.prompt_tokens = len(inp.prompt_ids)
        self.cached_tokens = 0
        self.error: InfermeshError | None = None
        self.first_token_at: float | None = None
        self.started_at = time.perf_counter()
        self._last_token_at = 0.0
        self._changed = asyncio.Event()
        self._woken_by: object = None  # what set _changed last: news, or only a waiting reader's timer
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # when the current wait gives up (loop time)
        self._waiting = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._prefix = block_hashes(inp.prompt_ids)
        # Set once admission is decided: the first lease granted, or the generation failed.
        self.decided = asyncio.Event()

    # -- the reader's side -------------------------------------------------
    def start(self) -> Generation:
        self._spawn(list(range(len(self.choices))), [])
        return self

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.reported for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.ids) for c in self.choices)

    async def wait(self, timeout: float | None = None) -> None:
        """Until there is something new to take (or `timeout` seconds, to send a keep-alive)."""
        if self._changed.is_set():
            return
        if timeout:
            # One timer serves many waits: it is only moved when a wait must end sooner.
            loop = asyncio.get_running_loop()
            self._deadline = deadline = loop.time() + timeout
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._timer_fired)
        else:
            self._deadline = None
        self._waiting = True
        try:
            await self._changed.wait()
        finally:
            self._waiting = False
        if self._woken_by is _TIMER:
            # Only the time passed: the next wait must wait again, not return at once.
            self._changed.clear()

    def _timer_fired(self) -> None:
        self._timer = None
        deadline = self._deadline
        if not self._waiting or deadline is None:
            return  # the wait it was for has ended
        loop = asyncio.get_running_loop()
        if deadline - loop.time() > 0.001:  # a later wait moved the deadline on
            self._timer = loop.call_at(deadline, self._timer_fired)
            return
        self._woken_by = _TIMER
        self._changed.set()

    def _notify(self) -> None:
        self._woken_by = None
        self._changed.set()

    def wake(self) -> None:
        """Makes `wait` return (the reader has something else to look at)."""
        self._notify()

    def take(self) -> list[Delta]:
        """Everything produced since the last call, one delta per choice that changed."""
        self._changed.clear()
        out = []
        for c in self.choices:
            if c.reported or not (c.pending_text or c.pending_ids or c.finish_reason):
                continue
            text = "".join(c.pending_text) if len(c.pending_text) != 1 else c.pending_text[0]
            out.append(Delta(c.index, text, c.pending_ids, c.pending_logprobs, c.finish_reason))
            c.pending_text, c.pending_ids, c.pending_logprobs = [], [], []
            if c.finish_reason:
                c.reported = True
        return out

    async def close(self) -> None:
        """Cancels whatever still runs (the client went away, or the request ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.first_token_at is not None:
            metrics.E2E.observe(time.perf_counter() - self.started_at)
        metrics.TOKENS_OUT.inc(self.completion_tokens)

    # -- the worker side ---------------------------------------------------
    def _spawn(self, indices: list[int], generated: list[int]) -> None:
        task = asyncio.get_running_loop().create_task(self._call(indices, generated))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail(self, exc: InfermeshError) -> None:
        if self.error is None:
            self.error = exc
        self.decided.set()
        self._notify()

    async def _call(self, indices: list[int], generated: list[int]) -> None:
        try:
            await self._run(indices, generated)
        except InfermeshError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("generation failed")
            self._fail(Unavailable(f"generation failed: {type(exc).__name__}"))

    def _admit_request(self, exclude: list[str], prompt_tokens: int, max_tokens: int,
                       n: int = 1) -> scheduler_pb2.AdmitRequest:
        inp = self.inp
        ctx = common_pb2.RequestContext(request_id=inp.request_id, tenant=inp.tenant, priority=inp.priority)
        if inp.deadline is not None:
            ctx.deadline.CopyFrom(Timestamp(seconds=int(inp.deadline), nanos=int(inp.deadline % 1 * 1e9)))
        return scheduler_pb2.AdmitRequest(context=ctx, model=inp.model, prompt_tokens=prompt_tokens,
                                          max_tokens=max_tokens, prefix_hashes=self._prefix,
                                          exclude_workers=exclude, n=n)

    async def _run(self, indices: list[int], generated: list[int]) -> None:
        inp = self.inp
        sampling = common_pb2.SamplingParams()
        sampling.CopyFrom(inp.sampling)
        sampling.n = len(indices)
        exclude: list[str] = []
        for attempt in range(1, MAX_ATTEMPTS + 1):
            already = len(generated)
            remaining = max(1, sampling.max_tokens - already)
            lease = await self.backends.admit(
                self._admit_request(exclude, len(inp.prompt_ids) + already, remaining, len(indices)),
                inp.admit_timeout)
            self.decided.set()
            try:
                await self._stream(lease, indices, generated, sampling)
                return
            except _WorkerFailed as failure:
                exclude += [x for x in (lease.worker_id, lease.worker_address) if x and x not in exclude]
                logger.warning("worker %s failed the request (%s: %s), attempt %d", lease.worker_id or
                               lease.worker_address, failure.code.name, failure, attempt)
                metrics.RETRIES.labels(reason=failure.code.name).inc()
                unfinished = [i for i in indices if not self.choices[i].finish_reason]
                if not unfinished:
                    return
                if len(unfinished) > 1 and any(self.choices[i].ids for i in unfinished):
                    # Each choice resumes from its own tokens, as a call of its own.
                    for i in unfinished:
                        self._spawn([i], list(self.choices[i].ids))
                    return
                indices = unfinished
                sampling.n = len(indices)
                generated = list(self.choices[indices[0]].ids) if len(indices) == 1 else []
        raise Unavailable(f"no worker could complete the request after {MAX_ATTEMPTS} attempts")

    async def _stream(self, lease: scheduler_pb2.Lease, indices: list[int], generated: list[int],
                      sampling: common_pb2.SamplingParams) -> None:
        """One worker call; _WorkerFailed when it should be retried elsewhere."""
        inp = self.inp
        request = worker_pb2.GenerateTokensRequest(
            context=common_pb2.RequestContext(request_id=inp.request_id, tenant=inp.tenant, priority=inp.priority),
            model=inp.model, lease_id=lease.lease_id, prompt_ids=inp.prompt_ids, generated_ids=generated,
            sampling=sampling)
        call = self.backends.worker(lease.worker_address).Generate(request,
                                                                  metadata=request_metadata(inp.request_id))
        received = False
        choices = self.choices
        read = call.read
        try:
            while (msg := await read()) is not grpc.aio.EOF:  # read() skips an async generator per message
                received = True
                choice = choices[indices[msg.index]] if msg.index < len(indices) else None
                if choice is None:
                    raise _WorkerFailed(grpc.StatusCode.INTERNAL, f"choice index {msg.index} out of range")
                if msg.finish_reason == "abort":
                    raise _WorkerFailed(grpc.StatusCode.ABORTED, "the worker aborted the request")
                if msg.cached_tokens and not self.cached_tokens:
                    self.cached_tokens = msg.cached_tokens
                self._on_tokens(choice, msg)
                if all(choices[i].finish_reason for i in indices):
                    return  # stop strings may end every choice early: `finally` frees the engine
            if not all(choices[i].finish_reason for i in indices):
                raise _WorkerFailed(grpc.StatusCode.UNAVAILABLE, "the stream ended before the choices finished")
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.CANCELLED and call.cancelled() and not received:
                self.backends.release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
                raise Cancelled("cancelled") from None
            if code in _RETRY_CODES:
                self.backends.release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)
                raise _WorkerFailed(code, err.details() or code.name) from None
            # The worker refused the request itself (a bad request): not the worker's failure.
            self.backends.release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
            raise from_rpc_error(err) from None
        except _WorkerFailed:
            self.backends.release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)
            raise
        except asyncio.CancelledError:
            if not received:
                self.backends.release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
            raise
        finally:
            call.cancel()  # however this ends, the worker stops generating for it (no-op when done)

    def _on_tokens(self, choice: Choice, msg: worker_pb2.GenerateTokensResponse) -> None:
        if choice.finish_reason:
            return
        ids = msg.token_ids
        now = time.perf_counter()
        if ids:
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.TTFT.observe(now - self.started_at)
            else:
                metrics.ITL.observe((now - self._last_token_at) / len(ids))
            self._last_token_at = now
            choice.ids.extend(ids)
            choice.pending_ids.extend(ids)
            if msg.logprobs:
                choice.pending_logprobs.extend(msg.logprobs)
            text = choice.stop.feed(choice.detokenizer.feed(ids))
            if choice.stop.stopped:
                choice.finish_reason = "stop"
        else:
            text = ""
        if msg.finish_reason and not choice.finish_reason:
            text += choice.stop.flush()
            choice.finish_reason = msg.finish_reason if msg.finish_reason in ("stop", "length") else "stop"
        if text:
            choice.text.append(text)
            choice.pending_text.append(text)
        self._notify()
