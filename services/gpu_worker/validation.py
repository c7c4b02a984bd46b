"""Turns a GenerateTokensRequest into the engine's GenerateRequest, or says clearly what is wrong.

Limits are checked here, once, for both engines, so a bad request never
reaches an engine (where it could fail a whole batch). Messages name the
parameter and the numbers, never prompt text.
"""

from __future__ import annotations

import math

from infermesh.common.errors import InvalidRequest
from infermesh.gpu_worker.engine import EngineInfo, GenerateRequest

MAX_N = 64
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise InvalidRequest(message, param=param)


def _vocab_check(ids: list[int], vocab: int, param: str) -> None:
    bad = next((t for t in ids if t >= vocab), None)
    _check(bad is None, f"{param}: token id {bad} is outside the vocabulary (size {vocab})", param)


def build_request(msg: object, info: EngineInfo, request_id: str) -> GenerateRequest:
    """`msg` is an infermesh.v1.GenerateTokensRequest."""
    prompt = list(msg.prompt_ids)  # type: ignore[attr-defined]
    generated = list(msg.generated_ids)  # type: ignore[attr-defined]
    s = msg.sampling  # type: ignore[attr-defined]
    _check(bool(prompt), "prompt_ids must not be empty", "prompt_ids")
    _vocab_check(prompt, info.vocab_size, "prompt_ids")
    _vocab_check(generated, info.vocab_size, "generated_ids")
    _vocab_check(list(s.stop_token_ids), info.vocab_size, "stop_token_ids")
    context = len(prompt) + len(generated)
    window = info.max_model_len
    _check(context < window, f"This model's maximum context length is {window} tokens. However, the "
           f"prompt has {context} tokens. Please reduce the length of the prompt.", "prompt_ids")
    if s.HasField("max_tokens"):
        max_tokens = s.max_tokens
        _check(max_tokens >= 1, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
        _check(max_tokens > len(generated), f"max_tokens ({max_tokens}) counts the {len(generated)} "
               "generated_ids and must exceed them", "max_tokens")
        _check(len(prompt) + max_tokens <= window,
               f"This model's maximum context length is {window} tokens. However, you requested "
               f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the prompt, {max_tokens} for the "
               "completion). Please reduce the length of the prompt or max_tokens.", "max_tokens")
        remaining = max_tokens - len(generated)
    else:
        remaining = window - context
    temperature = s.temperature if s.HasField("temperature") else 1.0
    _check(math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE,
           f"temperature must be between 0 and {MAX_TEMPERATURE:g}, got {temperature}", "temperature")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    _check(math.isfinite(top_p) and 0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}", "top_p")
    top_k = s.top_k if s.HasField("top_k") else 0
    _check(top_k >= -1, f"top_k must be -1, 0 (off) or positive, got {top_k}", "top_k")
    min_p = s.min_p if s.HasField("min_p") else 0.0
    _check(math.isfinite(min_p) and 0.0 <= min_p <= 1.0, f"min_p must be in [0, 1], got {min_p}", "min_p")
    penalties = {}
    for name, default, low, high in (("presence_penalty", 0.0, -2.0, 2.0),
                                     ("frequency_penalty", 0.0, -2.0, 2.0),
                                     ("repetition_penalty", 1.0, 0.0, 2.0)):
        value = getattr(s, name) if s.HasField(name) else default
        _check(math.isfinite(value) and low <= value <= high and (name != "repetition_penalty" or value > 0),
               f"{name} must be in {'(' if name == 'repetition_penalty' else '['}{low:g}, {high:g}], got {value}",
               name)
        penalties[name] = value
    n = s.n if s.HasField("n") else 1
    _check(1 <= n <= MAX_N, f"n must be between 1 and {MAX_N}, got {n}", "n")
    logprobs = s.logprobs if s.HasField("logprobs") else None
    _check(logprobs is None or logprobs <= MAX_LOGPROBS,
           f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}", "logprobs")
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    _check(min_tokens <= len(generated) + remaining,
           f"min_tokens ({min_tokens}) must not exceed max_tokens", "min_tokens")
    return GenerateRequest(
        request_id=request_id, prompt_ids=prompt + generated, max_tokens=remaining, n=n,
        temperature=temperature, top_p=top_p, top_k=max(top_k, 0), min_p=min_p,
        seed=s.seed if s.HasField("seed") else None, stop_token_ids=list(s.stop_token_ids),
        min_tokens=min_tokens, logprobs=logprobs, ignore_eos=s.ignore_eos,
        resumed_tokens=len(generated), **penalties)
