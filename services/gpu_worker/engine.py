"""The engine interface of the worker, and the plain data that crosses it.

An engine serves one model for one task (`EngineInfo.task`). A generate
engine's `generate` takes a validated `GenerateRequest` (prompt ids already
include any resumed ids; `max_tokens` is what is left to generate) and yields
`Delta`s, one choice at a time; closing or cancelling the iterator aborts the
request in the engine. An embed engine's `embed` takes a validated
`EmbedRequest` (a batch of token-id inputs) and returns one vector per input;
cancelling it aborts the inputs in the engine. `load` is cheap and synchronous
(the servicer reads it for every load report and metrics scrape).
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from infermesh.v1 import common_pb2


@dataclass
class EngineInfo:
    """What an engine serves and how much it can hold."""

    engine: str
    model: str
    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    kv_capacity_tokens: int
    block_size: int
    eos_token_ids: list[int] = field(default_factory=list)
    simulated: bool = False
    version: str = ""
    task: str = "generate"  # or "embed"
    embedding_dim: int = 0  # an embed engine's vector length


@dataclass
class GenerateRequest:
    """One request as the engine sees it (validated by `validation.build_request`)."""

    request_id: str
    prompt_ids: list[int]
    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop_token_ids: list[int] = field(default_factory=list)
    min_tokens: int = 0
    logprobs: int | None = None
    ignore_eos: bool = False
    # Ids generated elsewhere before a resume (already part of prompt_ids); they
    # count for penalties and min_tokens like tokens generated here, and a
    # constrained output's grammar is advanced over them.
    resumed_tokens: int = 0
    # The output's constraint (None: free text), and what the engine made of it in `validate`.
    structured: common_pb2.StructuredOutput | None = None
    constraint: dict[str, Any] | None = None


@dataclass
class EmbedRequest:
    """One batch of inputs as the engine sees it (validated by `validation.build_embed_request`)."""

    request_id: str
    inputs: list[list[int]]

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.inputs)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Delta:
    """New tokens of one choice. `finish_reason` is None until the choice's last delta."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_token_id: int | None = None
    cached_tokens: int = 0


@dataclass
class EngineLoad:
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0


class Engine(abc.ABC):
    """A model engine behind the worker's gRPC service."""

    info: EngineInfo

    @abc.abstractmethod
    async def start(self) -> None:
        """Loads the model; returns when the engine can take requests."""

    def validate(self, request: GenerateRequest) -> None:
        """Refuses (InvalidRequest) what this engine cannot do for a request, before it is admitted: an
        output constraint its backend cannot compile, above all."""
        return None

    @abc.abstractmethod
    def generate(self, request: GenerateRequest) -> AsyncGenerator[Delta, None]:
        """Streams deltas; aborts the request when the iterator is closed early."""

    async def embed(self, request: EmbedRequest) -> list[list[float]]:
        """One vector per input, in order (engines of the embed task)."""
        raise NotImplementedError(f"the {self.info.engine} engine does not embed")

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool:
        """Aborts a running request; False when it was not running."""

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """The engine's current load."""

    @abc.abstractmethod
    def healthy(self) -> bool:
        """False once the engine has failed and cannot recover."""

    async def shutdown(self) -> None:
        """Releases the engine (processes, memory)."""
        return None
