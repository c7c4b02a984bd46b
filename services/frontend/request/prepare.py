"""Before a request is admitted: the limits, the render, the context window and the prefix hashes.

`prepare` applies the mesh's one table of limits (`infermesh.common.limits`) to
the sampling parameters, renders the prompt (the tokenizer tier) or checks the
given token ids, and checks prompt plus `max_tokens` against the window the
model's workers report. Everything a worker would refuse is refused here, with
the same message, before anything is queued. The result is a plain
`PreparedRequest`: what admission and the worker calls need.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from infermesh.common.catalog import VERSION_SEP
from infermesh.common.errors import DeadlineExceeded, InvalidRequest, Unavailable
from infermesh.common.limits import check_context, check_sampling, check_vocab
from infermesh.common.prefix import DEFAULT_BLOCK_SIZE, block_hashes, cache_salt
from infermesh.frontend import metrics
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.interfaces import CallerContext, RequestBackends
from infermesh.v1 import common_pb2, tokenizer_pb2


@dataclass
class PreparedRequest(CallerContext):
    """Everything the worker side of a request needs."""

    request_id: str
    model: str
    prompt_ids: list[int]
    sampling: common_pb2.SamplingParams  # max_tokens set to the budget, n set, no stop strings
    stops: list[str]
    tokenizer: TokenizerModel
    tenant: str = ""
    priority: int = 0
    deadline: float | None = None  # unix seconds
    admit_timeout: float | None = None
    prefix_hashes: list[int] = field(default_factory=list)
    constraint_hash: int = 0  # the output constraint's class, for the scheduler's affinity (0: none)
    version_pinned: bool = False  # the caller asked for this version itself (`model` is NAME@VERSION)

    @property
    def n(self) -> int:
        return self.sampling.n or 1

    @property
    def constrained(self) -> bool:
        """The output is constrained (the worker acknowledges the constraint before its first token)."""
        return self.sampling.HasField("structured")


async def prepare(backends: RequestBackends, *, request_id: str, model: str, sampling: common_pb2.SamplingParams,
                  tenant: str, priority: int, messages: Sequence[common_pb2.ChatMessage] = (),
                  prompt: str | None = None, prompt_ids: list[int] | None = None, add_generation_prompt: bool = True,
                  params: Mapping[str, str] | None = None, deadline: float | None = None,
                  admit_timeout: float | None = None, tools: Sequence[common_pb2.Tool] = ()) -> PreparedRequest:
    """Validates, renders and checks the length. `params` names the API's own parameters (chat's
    `top_logprobs` is `logprobs` in SamplingParams); `tools` are shown to the model (a chat's, checked by
    `constraints.ToolPlan`, as the output constraint in `sampling.structured` is)."""
    if not model:
        raise InvalidRequest("model is required", param="model")
    if deadline is not None and deadline <= time.time():
        raise DeadlineExceeded("the request's deadline passed before it was admitted")
    check_sampling(sampling, params=params)
    prompt_param = "messages" if prompt is None and prompt_ids is None else "prompt"
    if prompt_ids is not None:
        tokenizer = await backends.tokenizer_model(model)
        if not prompt_ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        check_vocab(prompt_ids, tokenizer.vocab_size, "prompt")
        ids = list(prompt_ids)
    else:
        context = common_pb2.RequestContext(request_id=request_id, tenant=tenant,
                                            priority=common_pb2.Priority.ValueType(priority))
        render = tokenizer_pb2.RenderRequest(model=model, messages=messages, context=context,
                                             add_generation_prompt=add_generation_prompt, tools=tools)
        if prompt is not None:
            render.prompt = prompt
        rendered = await backends.render(render)
        tokenizer = await backends.tokenizer_model(model)
        ids = list(rendered.token_ids)
    check_vocab(list(sampling.stop_token_ids), tokenizer.vocab_size, "stop_token_ids")
    facts = await backends.model_facts(model)
    if facts is None or not facts.max_model_len:
        # The tokenizer knows the model (it rendered the prompt): no worker serving it (or none that has
        # said its context window yet: an engine still starting) is an outage, not the caller's mistake.
        raise Unavailable(f"no worker serves model {model!r} now" if facts is None else
                          f"the workers of {model!r} have not reported their context window yet")
    names = params or {}
    budget = check_context(len(ids), sampling.max_tokens if sampling.HasField("max_tokens") else None,
                           facts.max_model_len, min_tokens=sampling.min_tokens,
                           param=names.get("max_tokens", "max_tokens"), prompt_param=prompt_param)
    out = common_pb2.SamplingParams()
    out.CopyFrom(sampling)
    out.max_tokens = budget
    if not out.n:
        out.n = 1
    del out.stop[:]  # stop strings are matched here, in the frontend; the engine never sees them
    metrics.TOKENS_IN.inc(len(ids))
    base, _, version = model.partition(VERSION_SEP)  # a version's blocks are its own: the salt says which
    hashes = block_hashes(ids, facts.block_size or DEFAULT_BLOCK_SIZE, cache_salt(base, version))
    return PreparedRequest(request_id=request_id, model=model, prompt_ids=ids, sampling=out,
                           stops=list(sampling.stop), tokenizer=tokenizer, tenant=tenant, priority=priority,
                           deadline=deadline, admit_timeout=admit_timeout, prefix_hashes=hashes,
                           constraint_hash=constraint_hash(out))


def constraint_hash(sampling: common_pb2.SamplingParams) -> int:
    """A 64-bit class of the output's constraint (the same schema or tools: the same class; 0: none)."""
    if not sampling.HasField("structured"):
        return 0
    key = common_pb2.StructuredOutput()
    key.CopyFrom(sampling.structured)
    key.param = ""  # where it came from does not change the grammar
    digest = hashlib.blake2b(key.SerializeToString(deterministic=True), digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1
