"""What every OpenAI request of the mesh shares: the sampling fields, bounded by the one limits table, and parsing.

Unknown extra fields are ignored, as vLLM does. Validation errors become HTTP
400 naming the offending parameter. The bounds come from
`infermesh.common.limits.SAMPLING` (so the OpenAPI schema shows them), and the
sampling parameters a request produces are checked against the same table
again by the request path, as the gRPC API's and the worker's are.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from infermesh.common.errors import InvalidRequest
from infermesh.common.limits import MAX_STOPS, SAMPLING, UINT32
from infermesh.v1 import common_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

PRIORITIES = {"critical": common_pb2.PRIORITY_CRITICAL, "high": common_pb2.PRIORITY_HIGH,
              "normal": common_pb2.PRIORITY_NORMAL, "low": common_pb2.PRIORITY_LOW}


def limit(name: str) -> Any:
    """A sampling field's constraints, from the limits table."""
    return Field(**SAMPLING[name].pydantic())


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by chat and completions."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, limit("max_tokens")] | None = None
    temperature: Annotated[float, limit("temperature")] | None = None
    top_p: Annotated[float, limit("top_p")] | None = None
    top_k: Annotated[int, limit("top_k")] | None = None
    min_p: Annotated[float, limit("min_p")] | None = None
    n: Annotated[int, limit("n")] = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=UINT32)]] | None = None
    seed: Annotated[int, limit("seed")] | None = None
    presence_penalty: Annotated[float, limit("presence_penalty")] | None = None
    frequency_penalty: Annotated[float, limit("frequency_penalty")] | None = None
    repetition_penalty: Annotated[float, limit("repetition_penalty")] | None = None
    min_tokens: Annotated[int, limit("min_tokens")] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: Literal["critical", "high", "normal", "low"] | Annotated[int, Field(ge=0, le=4)] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings")
        return value

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def priority_value(self) -> int:
        if self.priority is None:
            return common_pb2.PRIORITY_UNSPECIFIED
        return PRIORITIES[self.priority] if isinstance(self.priority, str) else self.priority

    def output_limit(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        return None

    def sampling_params(self) -> dict[str, str]:
        """SamplingParams field -> this API's parameter name, where they differ."""
        return {}

    def to_sampling(self) -> common_pb2.SamplingParams:
        """The engine's sampling parameters (stop strings are matched by the frontend)."""
        params = common_pb2.SamplingParams(stop=self.stops, n=self.n, ignore_eos=self.ignore_eos)
        limit = self.output_limit()
        if limit is not None:
            params.max_tokens = limit
        for name in ("temperature", "top_p", "seed", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty", "min_tokens"):
            value = getattr(self, name)
            if value is not None:
                setattr(params, name, value)
        if self.stop_token_ids:
            params.stop_token_ids.extend(self.stop_token_ids)
        logprobs = self.num_logprobs()
        if logprobs is not None:
            params.logprobs = logprobs
        return params


def parse(model: type[SamplingFields], body: Any) -> Any:
    """Validates a decoded JSON body; InvalidRequest naming the first bad parameter."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest("the request contains invalid Unicode (a lone surrogate)") from None
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()) if not str(x).startswith(("function-", "constrained")))
        param = loc.split(".")[0] if loc else None
        message = first.get("msg", "invalid value")
        where = f"{loc}: " if loc else ""
        raise InvalidRequest(f"{where}{message}", param=param or None) from None
