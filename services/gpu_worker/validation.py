"""Turns a GenerateTokensRequest into the engine's GenerateRequest, or says clearly what is wrong.

The rules are the mesh's one table (`infermesh.common.limits`), the same the
frontend applied at the edge, checked again here against this engine's own
vocabulary and context window so that a bad request never reaches an engine
(where it could fail a whole batch). Messages name the parameter and the
numbers, never prompt text.
"""

from __future__ import annotations

from infermesh.common.errors import InvalidRequest
from infermesh.common.limits import (
    check_context,
    check_embed_count,
    check_embed_dimensions,
    check_embed_inputs,
    check_sampling,
    check_vocab,
)
from infermesh.gpu_worker.engine import EmbedRequest, EngineInfo, GenerateRequest
from infermesh.v1 import worker_pb2


def build_request(msg: worker_pb2.GenerateTokensRequest, info: EngineInfo, request_id: str) -> GenerateRequest:
    prompt = list(msg.prompt_ids)
    generated = list(msg.generated_ids)
    s = msg.sampling
    if not prompt:
        raise InvalidRequest("prompt_ids must not be empty", param="prompt_ids")
    check_vocab(prompt, info.vocab_size, "prompt_ids")
    check_vocab(generated, info.vocab_size, "generated_ids")
    check_sampling(s, vocab_size=info.vocab_size)
    min_tokens = s.min_tokens if s.HasField("min_tokens") else 0
    remaining = check_context(len(prompt), s.max_tokens if s.HasField("max_tokens") else None, info.max_model_len,
                              generated=len(generated), min_tokens=min_tokens, prompt_param="prompt_ids")
    top_k = s.top_k if s.HasField("top_k") else 0
    return GenerateRequest(
        request_id=request_id, prompt_ids=prompt + generated, max_tokens=remaining, n=s.n if s.HasField("n") else 1,
        temperature=s.temperature if s.HasField("temperature") else 1.0,
        top_p=s.top_p if s.HasField("top_p") else 1.0, top_k=max(top_k, 0),
        min_p=s.min_p if s.HasField("min_p") else 0.0,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
        repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
        seed=s.seed if s.HasField("seed") else None, stop_token_ids=list(s.stop_token_ids),
        min_tokens=min_tokens, logprobs=s.logprobs if s.HasField("logprobs") else None, ignore_eos=s.ignore_eos,
        resumed_tokens=len(generated), structured=s.structured if s.HasField("structured") else None)


def build_embed_request(msg: worker_pb2.EmbedTokensRequest, info: EngineInfo, request_id: str) -> EmbedRequest:
    """The same rules the frontend applied to the inputs (count, vocabulary, window, dimensions)."""
    inputs = [list(item.ids) for item in msg.inputs]
    check_embed_count(len(inputs), "inputs")
    for ids in inputs:
        if ids and (min(ids) < 0 or max(ids) >= info.vocab_size):
            check_vocab(ids, info.vocab_size, "inputs")
    check_embed_inputs([len(ids) for ids in inputs], info.max_model_len, "inputs")
    check_embed_dimensions(msg.dimensions, info.embedding_dim)
    return EmbedRequest(request_id=request_id, inputs=inputs)
