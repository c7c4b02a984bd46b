"""One request in flight: its prepared input, its output buffer and the attempts that fill it.

`start_generation` is the request path's one entry for every API: the model
(the catalog's aliases, a route's rules, the fallback chain, cooldowns: see
`targets.py` and `cooldown.py`), prepare (limits, render, context window),
then admission and worker calls in the background. The API's reader waits on `output`, takes what is new, and calls
`close()` however it ends (a client that goes away included), which cancels
the worker calls and releases their leases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

from infermesh.common.catalog import RequestFacts
from infermesh.common.errors import (
    ContextLengthExceeded,
    InfermeshError,
    InternalError,
    Overloaded,
    Unavailable,
)
from infermesh.frontend import metrics
from infermesh.frontend.models.versions import ANY_VERSION, VersionChoice
from infermesh.frontend.request.attempts import Attempts
from infermesh.frontend.request.interfaces import RequestBackends
from infermesh.frontend.request.output import OutputBuffer
from infermesh.frontend.request.prepare import PreparedRequest, prepare
from infermesh.frontend.request.targets import ModelTargets
from infermesh.v1 import common_pb2

logger = logging.getLogger(__name__)


@dataclass
class ServingOptions:
    keepalive: float = 5.0  # seconds between SSE comments while nothing comes
    first_event_wait: float = 1.0  # how long a stream may wait for its status before committing 200
    admit_timeout: float | None = None


class Generation:
    """One request: the model serving it (with the fallbacks left), its prepared input, its output, its attempts.

    Built by `start_generation`. A failure before the first token that the error table lets fall back
    (`fall_back`) sends the request to the next model of its chain: prepared (rendered) again for that
    model, the same output buffer retargeted to its tokenizer. After the first token only same-model
    migration (`Attempts`) continues a request; a model never changes mid-answer.
    """

    def __init__(self, backends: RequestBackends, prepare_for: Callable[[str], Awaitable[PreparedRequest]],
                 chain: list[str], targets: ModelTargets, requested: str) -> None:
        self.backends = backends
        self.requested = requested  # the name the client asked for (a model, an alias or a route)
        self.route: str | None = None  # the route whose rules chose the model, if any
        self.path: list[str] = []  # the models tried (or skipped in cooldown) in order; the last one serves
        self._prepare_for = prepare_for
        self._remaining = list(chain)
        self._targets = targets
        self._probe: str | None = None  # the model this request probes in cooldown
        self._switching: asyncio.Task[None] | None = None
        self._closed = False
        self.prepared: PreparedRequest
        self.output: OutputBuffer
        self.attempts: Attempts

    @property
    def model(self) -> str:
        """The model serving the request (the last one tried), by the name clients see (a version's model)."""
        return self._targets.served_name(self.prepared.model)

    @property
    def version(self) -> str:
        """The version of a versioned model serving the request ('' for a model without versions)."""
        served = self.prepared.model
        return served[len(self.model) + 1:] if served != self.model else ""

    @property
    def fallback(self) -> str:
        """The models tried, as `a>b` when the request fell back, else ''."""
        return ">".join(self.path) if len(self.path) > 1 else ""

    async def begin(self, ready: PreparedRequest | None = None) -> Generation:
        """Prepares the first model of the chain that can take the request and starts its attempts."""
        self.prepared = await self._next_model(ready, None)
        p = self.prepared
        self.output = OutputBuffer(p.n, p.tokenizer, p.stops, len(p.prompt_ids))
        self.output.on_first_token = self._first_token
        self.attempts = Attempts(self.backends, p, self.output, on_error=self._on_error).start()
        return self

    async def _next_model(self, ready: PreparedRequest | None, error: InfermeshError | None) -> PreparedRequest:
        """The next model of the chain prepared for this request (cooling models skipped while another is
        left; a prompt too long for a model goes on to the next); raises the last error when none is left."""
        cooldowns, tried = self._targets.cooldowns, bool(self.path)
        while self._remaining:
            name = self._remaining.pop(0)
            policy = self._targets.cooldown_policy(name)
            verdict = cooldowns.admits(name) if policy is not None else "yes"
            if verdict == "no" and self._remaining:
                self._note_fallback(name, self._remaining[0], "cooldown")
                self.path.append(name)
                continue
            if verdict == "no" and tried and error is not None:
                break  # the chain's last model is cooling and another already failed: that failure stands
            self._probe = name if verdict == "probe" else None
            try:
                prepared = ready if ready is not None and ready.model == name else await self._prepare_for(name)
            except InfermeshError as exc:
                # Refused before admission: a prompt too long for its window, no worker serving it now.
                if policy is not None and exc.cools_down:
                    cooldowns.failed(name, policy)
                    self._probe = None
                self._end_probe()
                self.path.append(name)
                if not exc.fall_back or not self._remaining:
                    raise
                self._note_fallback(name, self._remaining[0], _reason(exc))
                error, tried = exc, True
                continue
            except BaseException:
                self._end_probe()
                raise
            self.path.append(name)
            return prepared
        raise error if error is not None else Unavailable("no model of the fallback chain can take the request")

    def _note_fallback(self, from_model: str, to_model: str, reason: str) -> None:
        metrics.FALLBACKS.labels(from_model=from_model, to_model=to_model, reason=reason).inc()
        logger.info("request %s: %s -> %s (%s)", self.prepared.request_id if hasattr(self, "prepared") else "-",
                    from_model, to_model, reason)

    def _end_probe(self) -> None:
        if self._probe is not None:
            self._targets.cooldowns.probe_ended(self._probe)
            self._probe = None

    def _first_token(self) -> None:
        if self._probe is not None:
            self._targets.cooldowns.succeeded(self._probe)
            self._probe = None

    def _on_error(self, exc: InfermeshError) -> bool:
        """An error that would end the request: counted towards the model's cooldown, and taken on by the
        next model of the chain when nothing was produced yet (True)."""
        model = self.prepared.model
        policy = self._targets.cooldown_policy(model)
        if policy is not None and exc.cools_down:
            self._targets.cooldowns.failed(model, policy)
            self._probe = None
        else:
            self._end_probe()
        if (self._closed or self.output.first_token_at is not None or not exc.fall_back or not self._remaining
                or self._switching is not None):
            return False
        self._note_fallback(model, self._remaining[0], _reason(exc))
        self._switching = asyncio.get_running_loop().create_task(self._fall_back(exc))
        return True

    async def _fall_back(self, exc: InfermeshError) -> None:
        try:
            prepared = await self._next_model(None, exc)
        except InfermeshError as final:
            self.output.fail(final)
            return
        except asyncio.CancelledError:
            raise
        except Exception as unexpected:
            logger.exception("fallback failed")
            self.output.fail(InternalError(f"fallback failed: {type(unexpected).__name__}"))
            return
        finally:
            self._switching = None
        if self._closed:
            return
        self.prepared = prepared
        self.output.retarget(prepared.tokenizer, len(prepared.prompt_ids))
        self.output.wake()
        self.attempts = Attempts(self.backends, prepared, self.output, on_error=self._on_error).start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._switching is not None:
            self._switching.cancel()
            await asyncio.gather(self._switching, return_exceptions=True)
        self.output.close()
        await self.attempts.close()
        self._end_probe()
        if self.output.first_token_at is not None:
            metrics.E2E.observe(time.perf_counter() - self.output.started_at)
        metrics.TOKENS_OUT.inc(self.output.completion_tokens)
        if self._targets.catalog is not None:
            metrics.SERVED.labels(requested=self.requested, served=self.model).inc()


def _reason(exc: InfermeshError) -> str:
    if isinstance(exc, ContextLengthExceeded):
        return "context_length"
    if isinstance(exc, Overloaded):
        return "overloaded"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return "failed"


_NO_CATALOG = ModelTargets()


async def start_generation(backends: RequestBackends, options: ServingOptions, *, request_id: str, model: str,
                           sampling: common_pb2.SamplingParams, tenant: str, priority: int,
                           messages: Sequence[common_pb2.ChatMessage] = (), prompt: str | None = None,
                           prompt_ids: list[int] | None = None, add_generation_prompt: bool = True,
                           params: Mapping[str, str] | None = None, deadline: float | None = None,
                           targets: ModelTargets | None = None, facts: RequestFacts | None = None,
                           tools: Sequence[common_pb2.Tool] = (), version: VersionChoice = ANY_VERSION
                           ) -> Generation:
    """The request path's one entry: the model (aliases, a route's rules, the fallback chain and cooldowns of
    the catalog), prepared (limits, render, context window), and its attempts started.

    `facts` are what a route's rules read of the request besides its rendered length (the API fills them in);
    `tools` are a chat's tools shown to the model, checked with the output constraint (`sampling.structured`)
    by `constraints.ToolPlan` first. `version` picks the version of a versioned model (its sticky key; a version
    the caller pinned).
    """
    targets = targets or _NO_CATALOG
    if not version.key:
        version = dataclasses.replace(version, key=f"request:{request_id}")  # no caller to keep: this request
    pinned = targets.pinned(model, version)

    async def prepare_for(target: str) -> PreparedRequest:
        prepared = await prepare(backends, request_id=request_id, model=target, sampling=sampling, tenant=tenant,
                                 priority=priority, messages=messages, prompt=prompt, prompt_ids=prompt_ids,
                                 add_generation_prompt=add_generation_prompt, params=params, deadline=deadline,
                                 admit_timeout=options.admit_timeout, tools=tools)
        prepared.version_pinned = pinned
        return prepared

    route = targets.route_of(model)
    ready: PreparedRequest | None = None
    if route is not None:
        # The rules read the rendered prompt's length: render for the route's default model first (the
        # model that serves most requests), and again only when a rule picks another.
        default = targets.chain(targets.resolve(route.default), version)[0]
        try:
            ready = await prepare_for(default)
            prompt_tokens = len(ready.prompt_ids)
        except ContextLengthExceeded as exc:
            prompt_tokens = exc.prompt_tokens
        max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else None
        target = targets.choose(route, dataclasses.replace(facts or RequestFacts(), prompt_tokens=prompt_tokens,
                                                           max_tokens=max_tokens))
        metrics.ROUTE_DECISIONS.labels(route=route.name, target=target).inc()
    else:
        target = targets.resolve(model)
    gen = Generation(backends, prepare_for, targets.chain(target, version), targets, requested=model)
    gen.route = route.name if route is not None else None
    return await gen.begin(ready)
