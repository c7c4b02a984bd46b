"""Concurrent embeddings requests of one group coalesced into one admission and one worker call.

A single-sentence request costs the mesh a few milliseconds of CPU for its
admission, its lease and its worker call, several times the model's own work
on a short sentence. Requests that arrive together share that cost: a request
(validated and tokenized, its own errors already raised) joins the open batch
of its group, and the batch leaves on the event loop's next turn, taking every
request that joined meanwhile. There is no timer: a request never waits for
another to arrive, or for another's call (a lone request leaves at once, and
the frontend holds no queue of its own in front of the scheduler's).

- A group is (model, tenant, priority, dimensions): a batch is one tenant's
  work at one priority, so the scheduler's fair queue and its 429 see the same
  tenant and priority as the requests' own would have (the refusal of a batch
  is its tenant's refusal, with the same Retry-After).
- A batch holds at most `MAX_INPUTS` inputs and `MAX_TOKENS` tokens; a request
  that does not fit starts the next batch, and a larger one goes alone.
- Each caller gets its own vectors (in its order) and counts its own tokens.
  A caller that goes away or whose deadline passes leaves the batch: before it
  leaves, its inputs are dropped; after, its vectors are discarded and the
  others' work goes on. When every caller has gone, the batch is cancelled
  (its lease released, the worker call cancelled).
- A batch refused for a request's own fault (a 400 from the worker) is split
  and each request runs alone, so one bad request never fails another. Any
  other failure (the queue's 429, no worker, the deadline) is every member's
  own: they share the tenant, the priority and the model.
- The batch's deadline and admission timeout are its members' latest; each
  member still ends at its own deadline.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from infermesh.common.errors import DeadlineExceeded, InternalError, InvalidRequest

logger = logging.getLogger(__name__)

MAX_INPUTS = 64  # inputs of one batch
MAX_TOKENS = 16_384  # tokens of one batch's inputs together

Vectors = list[Sequence[float]]


class BatchParams(Protocol):
    """What the coalescer reads of a request (`EmbedParams`)."""

    @property
    def model(self) -> str: ...
    @property
    def request_id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def priority(self) -> int: ...
    @property
    def dimensions(self) -> int: ...

    def time_left(self) -> float | None: ...


P = TypeVar("P", bound=BatchParams)

# The admission and the worker call of one batch: its members' params (in order) and all their inputs
# -> one vector per input.
RunBatch = Callable[[Sequence[P], list[list[int]]], Awaitable[Vectors]]


@dataclass(eq=False)
class _Member(Generic[P]):
    params: P
    inputs: list[list[int]]
    tokens: int
    future: asyncio.Future[Vectors]


@dataclass(eq=False)
class _Batch(Generic[P]):
    key: tuple[str, str, int, int]
    members: list[_Member[P]] = field(default_factory=list)
    inputs: int = 0
    tokens: int = 0
    sent: bool = False  # the batch has left: no more joins, members leave by discarding their vectors
    task: asyncio.Task[None] | None = None

    def fits(self, inputs: int, tokens: int) -> bool:
        return not self.members or (self.inputs + inputs <= MAX_INPUTS and self.tokens + tokens <= MAX_TOKENS)


class EmbedCoalescer(Generic[P]):
    """The open batches of one frontend, by group; `submit` is one request's way through them."""

    def __init__(self, run: RunBatch[P]) -> None:
        self._run = run
        self._open: dict[tuple[str, str, int, int], _Batch[P]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, params: P, inputs: list[list[int]]) -> Vectors:
        """The vectors of one request's inputs (already validated), through the batch it joins."""
        loop = asyncio.get_running_loop()
        member = _Member(params, inputs, sum(len(ids) for ids in inputs), loop.create_future())
        batch = self._join(member)
        try:
            async with asyncio.timeout(params.time_left()):
                return await member.future
        except TimeoutError:
            raise DeadlineExceeded("the request's deadline passed before its vectors were ready") from None
        finally:
            if member.future.cancelled() or not member.future.done():  # it went away, or its deadline passed
                abandoned = self._leave(batch, member)
                if abandoned is not None:  # the last caller: its lease is released before it returns
                    await asyncio.wait({abandoned})

    def _join(self, member: _Member[P]) -> _Batch[P]:
        p = member.params
        key = (p.model, p.tenant, p.priority, p.dimensions)
        batch = self._open.get(key)
        if batch is None or not batch.fits(len(member.inputs), member.tokens):
            batch = self._open[key] = _Batch(key)
            task = batch.task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        batch.members.append(member)
        batch.inputs += len(member.inputs)
        batch.tokens += member.tokens
        if batch.inputs >= MAX_INPUTS or batch.tokens >= MAX_TOKENS:
            self._close(batch)
        return batch

    def _close(self, batch: _Batch[P]) -> None:
        if self._open.get(batch.key) is batch:
            del self._open[batch.key]

    def _leave(self, batch: _Batch[P], member: _Member[P]) -> asyncio.Task[None] | None:
        """Takes a member out; the batch's task, cancelled, when it was the last one waiting."""
        member.future.cancel()
        if not batch.sent:
            batch.members.remove(member)
            batch.inputs -= len(member.inputs)
            batch.tokens -= member.tokens
        if all(m.future.done() for m in batch.members) and batch.task is not None and not batch.task.done():
            self._close(batch)
            batch.task.cancel()  # nobody waits for it: its lease is released, its worker call cancelled
            return batch.task
        return None

    async def _send(self, batch: _Batch[P]) -> None:
        # Started on the loop's next turn: every request that joined meanwhile is in.
        self._close(batch)
        batch.sent = True
        members = [m for m in batch.members if not m.future.done()]
        if not members:
            return
        if len(members) > 1:
            logger.debug("embeddings batch of %d requests (%s)", len(members),
                         ", ".join(m.params.request_id for m in members))
        try:
            await self._deliver(members)
        except asyncio.CancelledError:
            for m in members:
                m.future.cancel()
            raise

    async def _deliver(self, members: list[_Member[P]]) -> None:
        try:
            vectors = await self._run([m.params for m in members], [ids for m in members for ids in m.inputs])
        except InvalidRequest as exc:
            if len(members) == 1:
                _fail(members, exc)
                return
            # A request's own fault, but whose? Each request alone: only the bad one fails.
            await asyncio.gather(*(self._deliver([m]) for m in members if not m.future.done()))
            return
        except Exception as exc:  # every member gets the batch's failure (the same tenant, priority and model)
            _fail(members, exc)
            return
        count = sum(len(m.inputs) for m in members)
        if len(vectors) != count:
            _fail(members, InternalError(f"{len(vectors)} vectors for the batch's {count} inputs"))
            return
        start = 0
        for m in members:
            end = start + len(m.inputs)
            if not m.future.done():
                m.future.set_result(vectors[start:end])
            start = end


def _fail(members: Sequence[_Member[P]], exc: BaseException) -> None:
    for m in members:
        if not m.future.done():
            m.future.set_exception(exc)
