"""The caller's deadline on the worker: one timer per request that stops it in the engine.

`RequestContext.deadline` is absolute unix time, so the worker reads it
against its wall clock (`infermesh.common.context.deadline_of`, `seconds_left`). While a request generates, one
`DeadlineTimer` (a single `loop.call_at`, no polling, nothing per token)
waits for it: when it fires, the request is aborted in the engine (which frees
its KV cache and ends the stream with "abort" deltas) and the servicer ends
the call with DEADLINE_EXCEEDED. Should the engine not end the stream within
`ABORT_GRACE` seconds (a request still waiting for an engine slot), the timer
cancels the call's task, which closes the stream and so aborts it anyway (the
call ends DEADLINE_EXCEEDED all the same, or CANCELLED should the task be
writing a reply at that moment).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How long the engine has to end an aborted request's stream before the call's task is cancelled.
ABORT_GRACE = 0.5


class DeadlineTimer:
    """Fires `abort` once `left` seconds have passed, unless `cancel` comes first.

    `expired`: the deadline passed and `abort` was called, so an "abort" the engine streams
    is the deadline's. `task` (the call's task) is cancelled when the engine does not end
    the stream within `grace` seconds of the abort; `forced` then says the cancellation
    is the timer's, not the client's.
    """

    def __init__(self, left: float, abort: Callable[[], object], task: asyncio.Task[object] | None, *,
                 grace: float = ABORT_GRACE) -> None:
        self.expired = False
        self.forced = False
        self._abort = abort
        self._task = task
        self._grace = grace
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = self._loop.call_at(self._loop.time() + left, self._fire)

    def _fire(self) -> None:
        self.expired = True
        self._handle = self._loop.call_later(self._grace, self._force)
        self._abort()

    def _force(self) -> None:
        self._handle = None
        if self._task is not None and not self._task.done():
            self.forced = True
            self._task.cancel()

    def cancel(self) -> None:
        """The stream ended: the timer (or the grace that follows it) has nothing more to do."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
