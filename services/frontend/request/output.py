"""The output buffer of one request: what its workers produced that the reader has not taken yet.

Token-id deltas are detokenized and stop-matched as they arrive (`feed`) and
appended to their choice's pending output; the reader (an SSE stream, a gRPC
stream or a whole response) takes everything pending whenever it is ready
(`take`). A slow client therefore gets fewer, larger chunks, and memory is
bounded by the request's own output. The buffer knows nothing of workers or
leases: `infermesh.frontend.request.attempts` fills it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from infermesh.common.errors import InfermeshError
from infermesh.frontend import metrics
from infermesh.frontend.request.detokenizer import Detokenizer, TokenizerModel
from infermesh.frontend.request.stop import StopMatcher
from infermesh.v1 import common_pb2

_TIMER = object()  # marks a wake-up by a waiting reader's timeout, not by news


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Delta:
    """New output of one choice since the reader last took it."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[common_pb2.TokenLogprob]
    finish_reason: str


@dataclass
class ChoiceResult:
    """One finished choice, for a whole (non-streamed) response."""

    index: int
    text: str
    finish_reason: str
    logprobs: list[common_pb2.TokenLogprob] = field(default_factory=list)


@dataclass
class Result:
    choices: list[ChoiceResult]
    usage: Usage


@dataclass
class ChoiceOutput:
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


class OutputBuffer:
    """The choices of one request as the workers fill them and the reader drains them."""

    def __init__(self, n: int, tokenizer: TokenizerModel, stops: list[str], prompt_tokens: int) -> None:
        self._stops = stops
        self.choices = [ChoiceOutput(i, tokenizer.detokenizer(), StopMatcher(stops)) for i in range(n)]
        self.prompt_tokens = prompt_tokens
        self.on_first_token: Callable[[], None] | None = None  # called once, at the first token
        self.cached_tokens = 0
        self.error: InfermeshError | None = None
        self.started_at = time.perf_counter()
        self.first_token_at: float | None = None
        self._last_token_at = 0.0
        # Set once admission is decided: the first lease granted, or the request failed.
        self.decided = asyncio.Event()
        self._changed = asyncio.Event()
        self._woken_by: object = None  # what set _changed last: news, or only a waiting reader's timer
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None  # when the current wait gives up (loop time)
        self._waiting = False

    # -- the writer's side (attempts) --------------------------------------
    def feed(self, index: int, ids: list[int] | None, logprobs: list[common_pb2.TokenLogprob] | None = None,
             finish_reason: str = "") -> None:
        """A worker's delta for choice `index`; a choice already finished (a stop string) ignores it."""
        choice = self.choices[index]
        if choice.finish_reason:
            return
        text = ""
        if ids:
            now = time.perf_counter()
            if self.first_token_at is None:
                self.first_token_at = now
                metrics.TTFT.observe(now - self.started_at)
                if self.on_first_token is not None:
                    self.on_first_token()
            else:
                metrics.ITL.observe((now - self._last_token_at) / len(ids))
            self._last_token_at = now
            choice.ids.extend(ids)
            choice.pending_ids.extend(ids)
            if logprobs:
                choice.pending_logprobs.extend(logprobs)
            text = choice.stop.feed(choice.detokenizer.feed(ids))
            if choice.stop.stopped:
                choice.finish_reason = "stop"
        if finish_reason and not choice.finish_reason:
            text += choice.stop.flush()
            choice.finish_reason = finish_reason if finish_reason in ("stop", "length") else "stop"
        if text:
            choice.text.append(text)
            choice.pending_text.append(text)
        self._notify()

    def retarget(self, tokenizer: TokenizerModel, prompt_tokens: int) -> None:
        """Before the first token only: another model (a fallback) will fill the buffer, with its tokenizer."""
        assert self.first_token_at is None and not any(c.ids for c in self.choices)
        self.choices = [ChoiceOutput(i, tokenizer.detokenizer(), StopMatcher(self._stops))
                        for i in range(len(self.choices))]
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0

    def admitted(self) -> None:
        self.decided.set()

    def fail(self, exc: InfermeshError) -> None:
        if self.error is None:
            self.error = exc
        self.decided.set()
        self._notify()

    def finished(self, index: int) -> bool:
        return bool(self.choices[index].finish_reason)

    # -- the reader's side -------------------------------------------------
    @property
    def done(self) -> bool:
        return self.error is not None or all(c.reported for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.ids) for c in self.choices)

    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

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

    def result(self, logprobs: dict[int, list[common_pb2.TokenLogprob]] | None = None) -> Result:
        """The whole output once done (`logprobs`: what the reader collected per choice)."""
        got = logprobs or {}
        return Result([ChoiceResult(c.index, "".join(c.text), c.finish_reason or "stop", got.get(c.index, []))
                       for c in self.choices], self.usage())

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
