"""The embeddings' request path, shared by `POST /v1/embeddings` and gRPC `Embed`: generation's admission.

`embed` takes an API's parsed inputs (texts, or lists of token ids) and:

1. checks the model serves embeddings (the task its workers report, through
   the scheduler's model cards; a 400 naming `model` otherwise) and
   `dimensions` against its vectors' length;
2. tokenizes the texts with the model's special tokens, as `transformers` and
   sentence-transformers do: short ones in-process from the tokenizer
   definition the frontend holds (`embed_tokens.py`: the tokenizer tier's own
   encoder, so the same ids), longer ones by the tokenizer tier's `Encode`;
   or checks the token ids against the vocabulary;
3. truncates the inputs when `truncate_prompt_tokens` asks for it (keeping a
   text's special tokens, as `transformers`' truncation does), and checks each
   against the window the workers report (`infermesh.common.limits`): a longer
   input is a 400 naming `input`, never a silent truncation;
4. hands the inputs to the frontend's coalescer (`embed_batch.py`), which puts
   the concurrent requests of one model, tenant and priority into one batch
   (no timer: what arrived together leaves together) and gives each caller
   its own vectors and errors;
5. per batch (`_run_batch`): asks the scheduler for a lease (one sequence,
   `prompt_tokens` the inputs' tokens together, `max_tokens` 0: an embed
   worker holds requests and input tokens; the fair queue, its 429 and the
   deadline are generation's), then calls the leased worker's `Embed`. A
   failure the error table marks `retry_elsewhere` (a refusal at capacity, a
   worker that dies or drains) excludes that worker and takes another lease,
   up to `MAX_ATTEMPTS` as in generation; anything else fails the batch.

A lease the worker ran ends by the worker's load report. The path releases it
itself when the worker did not complete it: WORKER_FAILED after a failure that
is retried elsewhere, CANCELLED otherwise (every caller went away, the
request's deadline, a refusal of the request itself).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import grpc
from infermesh.common.context import request_metadata
from infermesh.common.errors import DeadlineExceeded, InvalidRequest, NotFound, Unavailable, from_rpc_error
from infermesh.common.limits import (
    TRUNCATION_SIDES,
    check_embed_count,
    check_embed_dimensions,
    check_embed_inputs,
    check_vocab,
    embed_truncation,
)
from infermesh.frontend import metrics
from infermesh.frontend.request.attempts import MAX_ATTEMPTS
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.embed_batch import EmbedCoalescer, Vectors
from infermesh.frontend.request.embed_tokens import encode_inputs
from infermesh.frontend.request.interfaces import CallerContext, ModelFacts
from infermesh.v1 import common_pb2, scheduler_pb2, tokenizer_pb2, worker_pb2

logger = logging.getLogger(__name__)


class EmbedBackends(Protocol):
    """What the embeddings' path needs of the other tiers (`infermesh.frontend.backends.Backends`)."""

    async def tokenizer_model(self, model: str) -> TokenizerModel: ...

    async def model_facts(self, model: str) -> ModelFacts | None: ...

    async def model_cards(self, fresh: bool = False) -> list[common_pb2.ModelCard]: ...

    async def encode(self, request: tokenizer_pb2.EncodeRequest, request_id: str) -> tokenizer_pb2.EncodeResponse: ...

    async def admit(self, request: scheduler_pb2.AdmitRequest, timeout: float | None) -> scheduler_pb2.Lease: ...

    def release(self, lease_id: str, outcome: int) -> None: ...

    async def embed(self, address: str, request: worker_pb2.EmbedTokensRequest,
                    metadata: Sequence[tuple[str, str]], timeout: float | None) -> worker_pb2.EmbedTokensResponse: ...


@dataclass
class EmbedParams(CallerContext):
    """One embeddings request, as the APIs parsed it (`model`: the model the scheduler knows, aliases resolved)."""

    model: str
    request_id: str
    tenant: str = ""
    priority: int = 0
    deadline: float | None = None  # unix seconds
    admit_timeout: float | None = None
    dimensions: int = 0  # 0: not given
    truncate_prompt_tokens: int | None = None
    truncation_side: str = "right"
    param: str = "input"  # the API's name of the inputs, for its errors


@dataclass
class EmbedResult:
    model: str
    vectors: list[Sequence[float]]  # one per input, in order (the worker's float32 values)
    prompt_tokens: int


class _WorkerFailed(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason  # a gRPC code name, for the retries metric


def truncate_ids(ids: list[int], keep: int, side: str, specials: Sequence[int] = ()) -> list[int]:
    """At most `keep` ids: the first (side "right") or last ("left") of the content, keeping the special
    tokens the tokenizer puts around it (`specials`: what it makes of an empty text, e.g. [CLS] [SEP])."""
    if len(ids) <= keep:
        return ids
    n = len(specials)
    split = next((p for p in range(n, -1, -1) if ids[:p] == list(specials[:p])
                  and ids[len(ids) - (n - p):] == list(specials[p:])), None)
    room = keep - n
    if split is None or room <= 0 or len(ids) < n:
        return ids[:keep] if side == "right" else ids[-keep:]
    head, tail = ids[:split], ids[len(ids) - (n - split):]
    body = ids[split:len(ids) - (n - split)]
    return head + (body[:room] if side == "right" else body[-room:]) + tail


async def _served_facts(backends: EmbedBackends, model: str) -> tuple[ModelFacts, common_pb2.ModelCard | None]:
    """The window the model's workers report and its card; a 400 when it is not an embed model."""
    facts = await backends.model_facts(model)
    if facts is None:
        raise Unavailable(f"no worker serves model {model!r} now")
    card = next((c for c in await backends.model_cards() if c.id == model), None)
    task = (card.task if card is not None else "") or "generate"
    if task != "embed":
        raise InvalidRequest(f"the model `{model}` serves chat and completions, not embeddings", param="model")
    if not facts.max_model_len:
        raise Unavailable(f"the workers of {model!r} have not reported their context window yet")
    return facts, card


async def _inputs(backends: EmbedBackends, p: EmbedParams, tokenizer: TokenizerModel, window: int,
                  texts: Sequence[str] | None, token_ids: Sequence[Sequence[int]] | None) -> list[list[int]]:
    """The inputs' token ids, truncated as asked and checked against the vocabulary and the window."""
    keep = embed_truncation(p.truncate_prompt_tokens, window)
    if p.truncation_side not in TRUNCATION_SIDES:
        raise InvalidRequest(f"truncation_side must be one of {', '.join(TRUNCATION_SIDES)}, got "
                             f"{p.truncation_side!r}", param="truncation_side")
    specials: Sequence[int] = ()
    if texts is not None:
        # With truncation, one more text (an empty one) shows the special tokens each input carries.
        batch = [*texts, ""] if keep is not None else list(texts)
        encoded = encode_inputs(tokenizer, batch)
        if encoded is None:  # too long to encode on the frontend's loop: the tokenizer tier
            reply = await backends.encode(tokenizer_pb2.EncodeRequest(model=p.model, texts=batch,
                                                                      add_special_tokens=True), p.request_id)
            if len(reply.items) != len(batch):
                raise Unavailable(f"the tokenizer encoded {len(reply.items)} of {len(batch)} texts")
            encoded = [list(item.ids) for item in reply.items]
        items = encoded
        if keep is not None:
            specials = items.pop()
    else:
        assert token_ids is not None
        items = [list(ids) for ids in token_ids]
        for ids in items:
            check_vocab(ids, tokenizer.vocab_size, p.param)
    if keep is not None:
        items = [truncate_ids(ids, keep, p.truncation_side, specials) for ids in items]
    check_embed_inputs([len(ids) for ids in items], window, p.param)
    return items


async def embed(backends: EmbedBackends, p: EmbedParams, *, texts: Sequence[str] | None = None,
                token_ids: Sequence[Sequence[int]] | None = None) -> EmbedResult:
    """Exactly one of `texts` and `token_ids` (each item one input): their vectors."""
    count = len(texts) if texts is not None else len(token_ids or ())
    check_embed_count(count, p.param)
    if texts is not None:
        empty = next((i for i, t in enumerate(texts) if not t), None)
        if empty is not None:
            which = "the input" if count == 1 else f"{p.param}[{empty}]"
            raise InvalidRequest(f"{which} is an empty string; every input needs some text", param=p.param)
    try:
        tokenizer = await backends.tokenizer_model(p.model)
    except NotFound as exc:  # the tokenizer tier knows no such model (its answer names no parameter)
        raise NotFound(exc.message, param="model") from None
    facts, card = await _served_facts(backends, p.model)
    check_embed_dimensions(p.dimensions, card.embedding_dim if card is not None else 0)
    inputs = await _inputs(backends, p, tokenizer, facts.max_model_len, texts, token_ids)
    total = sum(len(ids) for ids in inputs)
    metrics.TOKENS_IN.inc(total)
    vectors = await _coalescer(backends).submit(p, inputs)
    return EmbedResult(p.model, vectors, total)


_coalescers: weakref.WeakKeyDictionary[EmbedBackends, EmbedCoalescer[EmbedParams]] = weakref.WeakKeyDictionary()


def _coalescer(backends: EmbedBackends) -> EmbedCoalescer[EmbedParams]:
    """The coalescer of the requests over these backends (one per frontend: the APIs share it)."""
    coalescer = _coalescers.get(backends)
    if coalescer is None:
        ref = weakref.ref(backends)  # the coalescer must not keep its key alive

        async def run(members: Sequence[EmbedParams], inputs: list[list[int]]) -> Vectors:
            live = ref()
            if live is None:
                raise Unavailable("the frontend is shutting down")
            return await _run_batch(live, members, inputs)
        coalescer = _coalescers[backends] = EmbedCoalescer(run)
    return coalescer


def _batch_params(members: Sequence[EmbedParams]) -> EmbedParams:
    """A batch's params: its first request's (its id names the batch in the tiers' logs), with the members'
    latest deadline and admission timeout (each member ends at its own deadline in the coalescer)."""
    first = members[0]
    if len(members) == 1:
        return first

    def latest(values: list[float | None]) -> float | None:
        return None if None in values else max(v for v in values if v is not None)
    return replace(first, deadline=latest([m.deadline for m in members]),
                   admit_timeout=latest([m.admit_timeout for m in members]))


async def _run_batch(backends: EmbedBackends, members: Sequence[EmbedParams], inputs: list[list[int]]) -> Vectors:
    """One batch's lease and worker call, with retries elsewhere: one vector per input."""
    p = _batch_params(members)
    total = sum(len(ids) for ids in inputs)
    request = worker_pb2.EmbedTokensRequest(context=p.context(), model=p.model, dimensions=p.dimensions,
                                            inputs=[common_pb2.TokenIds(ids=ids) for ids in inputs])
    exclude: list[str] = []
    for attempt in range(1, MAX_ATTEMPTS + 1):
        lease = await backends.admit(scheduler_pb2.AdmitRequest(
            context=request.context, model=p.model, prompt_tokens=total, max_tokens=0, n=1,
            exclude_workers=exclude), _admit_timeout(p))
        request.lease_id = lease.lease_id
        try:
            reply = await _call(backends, lease, request, p)
        except _WorkerFailed as failure:
            exclude = list(dict.fromkeys([*exclude, *(x for x in (lease.worker_id, lease.worker_address) if x)]))
            logger.warning("worker %s failed an embeddings request (%s: %s), attempt %d",
                           lease.worker_id or lease.worker_address, failure.reason, failure, attempt)
            metrics.RETRIES.labels(reason=failure.reason).inc()
            continue
        return [v.values for v in reply.embeddings]
    raise Unavailable(f"no worker could complete the request after {MAX_ATTEMPTS} attempts")


def _admit_timeout(p: EmbedParams) -> float | None:
    left = p.time_left()
    if left is not None and left <= 0:
        raise DeadlineExceeded("the request's deadline passed before it was admitted")
    bounds = [t for t in (p.admit_timeout, left) if t is not None]
    return min(bounds) if bounds else None


async def _call(backends: EmbedBackends, lease: scheduler_pb2.Lease, request: worker_pb2.EmbedTokensRequest,
                p: EmbedParams) -> worker_pb2.EmbedTokensResponse:
    """One worker call under a lease; _WorkerFailed when another worker should take the request."""
    release = backends.release
    try:
        reply = await backends.embed(lease.worker_address, request, request_metadata(p.request_id), p.time_left())
    except grpc.RpcError as err:
        exc = from_rpc_error(err)
        if exc.retry_elsewhere:
            release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_WORKER_FAILED)
            raise _WorkerFailed(err.code().name, exc.message) from None
        # Refused for the request itself (a bad request, its deadline): not the worker's failure.
        release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
        raise exc from None
    except asyncio.CancelledError:
        release(lease.lease_id, scheduler_pb2.LEASE_OUTCOME_CANCELLED)
        raise
    if len(reply.embeddings) != len(request.inputs):
        raise _WorkerFailed("INTERNAL", f"the worker returned {len(reply.embeddings)} vectors for "
                                        f"{len(request.inputs)} inputs")
    return reply
