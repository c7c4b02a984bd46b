"""The one table of request limits, and the one context-window check.

Every API and the worker validate a request with these functions, from this
table: the HTTP API (its request models take their bounds from `SAMPLING`, and
the sampling parameters they produce are checked by `check_sampling`), the
public gRPC API (`check_sampling` on the request's `SamplingParams`), and the
worker (`check_sampling` again, then `check_context` against its engine's own
window). So a request the worker would refuse is refused at the edge, with the
same message, however loaded the mesh is.

The context window has one source: the engine's `max_model_len`, which each
worker reports (WorkerInfo, load reports) and the scheduler lists per model
(ModelCard). Messages name the parameter and the numbers, never prompt text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infermesh.common.errors import ContextLengthExceeded, InvalidRequest

UINT32 = 2 ** 32 - 1
INT32 = 2 ** 31 - 1
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass(frozen=True)
class Bound:
    """The allowed range of one sampling parameter (a `SamplingParams` field of the same name)."""

    name: str
    low: float
    high: float
    integer: bool = False
    low_open: bool = False  # the low end itself is refused
    doc: str = ""

    def allows(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if value < self.low or value > self.high:
            return False
        return not (self.low_open and value == self.low)

    def describe(self) -> str:
        low = f"{self.low:g}" if not self.integer else str(int(self.low))
        high = f"{self.high:g}" if not self.integer else str(int(self.high))
        return f"{'(' if self.low_open else '['}{low}, {high}]"

    def pydantic(self) -> dict[str, Any]:
        """The bound as pydantic `Field` constraints (for the HTTP models and their OpenAPI schema)."""
        out: dict[str, Any] = {"gt" if self.low_open else "ge": int(self.low) if self.integer else self.low,
                               "le": int(self.high) if self.integer else self.high}
        if not self.integer:
            out["allow_inf_nan"] = False
        return out


MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOPS = 16
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 64
MAX_BODY_BYTES = 4 * 1024 * 1024  # the frontend's default --max-body-bytes (larger: HTTP 413)

SAMPLING: Mapping[str, Bound] = {b.name: b for b in (
    Bound("max_tokens", 1, UINT32, integer=True, doc="tokens to generate"),
    Bound("temperature", 0.0, 2.0),
    Bound("top_p", 0.0, 1.0, low_open=True),
    Bound("top_k", -1, INT32, integer=True, doc="-1 or 0: off"),
    Bound("min_p", 0.0, 1.0),
    Bound("presence_penalty", -2.0, 2.0),
    Bound("frequency_penalty", -2.0, 2.0),
    Bound("repetition_penalty", 0.0, 2.0, low_open=True, doc="1: off"),
    Bound("min_tokens", 0, UINT32, integer=True),
    Bound("n", 1, MAX_N, integer=True, doc="choices"),
    Bound("logprobs", 0, MAX_LOGPROBS, integer=True, doc="top log-probabilities per token"),
    Bound("seed", INT64_MIN, INT64_MAX, integer=True),
)}


def check_sampling(s: Any, *, params: Mapping[str, str] | None = None, vocab_size: int = 0) -> None:
    """Checks an `infermesh.v1.SamplingParams` against the table; InvalidRequest naming the parameter.

    `params` renames fields to the API's own parameter names (chat's `top_logprobs` is `logprobs`
    here); `vocab_size`, when known, bounds `stop_token_ids`.
    """
    names = params or {}
    for bound in SAMPLING.values():
        if s.HasField(bound.name):
            value = getattr(s, bound.name)
            if not bound.allows(value):
                param = names.get(bound.name, bound.name)
                raise InvalidRequest(f"{param} must be in {bound.describe()}, got {value}", param=param)
    if len(s.stop) > MAX_STOPS:
        raise InvalidRequest(f"at most {MAX_STOPS} stop strings, got {len(s.stop)}", param="stop")
    for stop in s.stop:
        if len(stop) > MAX_STOP_CHARS:
            raise InvalidRequest(f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(stop)}",
                                 param="stop")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(s.stop_token_ids)}",
                             param="stop_token_ids")
    if vocab_size:
        check_vocab(list(s.stop_token_ids), vocab_size, "stop_token_ids")


def check_vocab(ids: list[int], vocab_size: int, param: str) -> None:
    """Every id within the vocabulary (and not empty where a prompt is meant)."""
    bad = next((t for t in ids if t < 0 or t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"{param}: token id {bad} is outside the vocabulary (size {vocab_size})", param=param)


def check_context(prompt_tokens: int, max_tokens: int | None, window: int, *, generated: int = 0,
                  min_tokens: int = 0, param: str = "max_tokens", prompt_param: str = "messages") -> int:
    """The context-window rule: the output budget left (tokens still to generate), or InvalidRequest.

    `prompt_tokens` excludes `generated` (tokens produced before a resume, which `max_tokens`
    counts); without `max_tokens` the budget is the rest of the window.
    """
    context = prompt_tokens + generated
    if max_tokens is not None:
        if prompt_tokens + max_tokens > window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} for the "
                f"completion). Please reduce the length of the prompt or {param}.",
                param=param if prompt_tokens < window else prompt_param, prompt_tokens=prompt_tokens)
        if max_tokens <= generated:
            raise InvalidRequest(f"{param} ({max_tokens}) counts the {generated} generated_ids (tokens "
                                 "generated before a resume) and must exceed them", param=param)
        budget = max_tokens - generated
    else:
        if context >= window:
            raise ContextLengthExceeded(f"This model's maximum context length is {window} tokens. However, the prompt "
                                 f"has {context} tokens. Please reduce the length of the prompt.",
                                 param=prompt_param, prompt_tokens=prompt_tokens)
        budget = window - context
    if min_tokens > generated + budget:
        raise InvalidRequest(f"min_tokens ({min_tokens}) must not exceed the tokens that fit "
                             f"({generated + budget})", param="min_tokens")
    return budget


def fits_context(prompt_tokens: int, max_tokens: int, window: int) -> bool:
    """True when `prompt_tokens + max_tokens` fit the window (0: unknown, anything fits)."""
    return not window or prompt_tokens + max_tokens <= window


# ---- embeddings (POST /v1/embeddings, gRPC Embed, the worker's Embed) ---------------------------

MAX_EMBED_INPUTS = 2048  # inputs per request (OpenAI's bound)
MAX_EMBED_TOKENS = 300_000  # tokens of all the inputs of one request together (OpenAI's bound)
EMBED_ENCODINGS = ("float", "base64")
TRUNCATION_SIDES = ("right", "left")  # right: keep the first tokens; left: keep the last


def check_embed_count(count: int, param: str = "input") -> None:
    """At least one input, at most MAX_EMBED_INPUTS."""
    if count == 0:
        raise InvalidRequest(f"{param} must not be empty", param=param)
    if count > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"{param} may hold at most {MAX_EMBED_INPUTS} inputs, got {count}", param=param)


def check_embed_dimensions(dimensions: int, model_dim: int) -> None:
    """`dimensions` (0: not given) must be the model's own: the mesh truncates no vector (no Matryoshka)."""
    if dimensions and model_dim and dimensions != model_dim:
        raise InvalidRequest(f"dimensions must be the model's own ({model_dim}): it does not support Matryoshka "
                             f"embeddings of other sizes, got {dimensions}", param="dimensions")


def embed_truncation(truncate: int | None, window: int) -> int | None:
    """The tokens kept of each input under vLLM's `truncate_prompt_tokens` (-1: the window); None: no truncation."""
    if truncate is None:
        return None
    if truncate == -1:
        return window
    if truncate < 1:
        raise InvalidRequest(f"truncate_prompt_tokens must be -1 (the context window) or at least 1, got {truncate}",
                             param="truncate_prompt_tokens")
    if truncate > window:
        raise InvalidRequest(f"truncate_prompt_tokens ({truncate}) cannot be greater than the model's maximum "
                             f"context length ({window})", param="truncate_prompt_tokens")
    return truncate


def check_embed_inputs(lengths: list[int], window: int, param: str = "input") -> int:
    """Every input between 1 token and the window, all of them within MAX_EMBED_TOKENS; returns their sum."""
    for i, n in enumerate(lengths):
        which = "the input" if len(lengths) == 1 else f"{param}[{i}]"
        if n == 0:
            raise InvalidRequest(f"{which} must not be empty", param=param)
        if n > window:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {window} tokens. However, {which} has {n} tokens. "
                "Please reduce the length of the input, or set truncate_prompt_tokens.", param=param, prompt_tokens=n)
    total = sum(lengths)
    if total > MAX_EMBED_TOKENS:
        raise InvalidRequest(f"the inputs have {total} tokens together; a request may have at most "
                             f"{MAX_EMBED_TOKENS}", param=param)
    return total
