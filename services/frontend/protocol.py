"""Request models of the OpenAI API (chat and completions) and their conversion to SamplingParams.

Unknown extra fields are ignored, as vLLM does. Validation errors become HTTP
400 with the offending parameter named (see `errors.py`).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from infermesh.common.errors import InvalidRequest
from infermesh.v1 import common_pb2
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MAX_N = 16
MAX_STOPS = 16
UINT32 = 2 ** 32 - 1
INT32 = 2 ** 31 - 1
PRIORITIES = {"critical": common_pb2.PRIORITY_CRITICAL, "high": common_pb2.PRIORITY_HIGH,
              "normal": common_pb2.PRIORITY_NORMAL, "low": common_pb2.PRIORITY_LOW}


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Model):
    include_usage: bool = False


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported, got "
                                     f"{part.type!r}", param=f"messages[{index}].content")
            texts.append(part.text)
        return "".join(texts)


class SamplingFields(_Model):
    """Fields shared by chat and completions."""

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1, le=UINT32)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1, le=INT32)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0, le=UINT32)]] | None = None
    seed: Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 63)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    min_tokens: Annotated[int, Field(ge=0, le=UINT32)] | None = None
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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1, le=UINT32)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat_messages(self) -> list[common_pb2.ChatMessage]:
        out = []
        for i, m in enumerate(self.messages):
            msg = common_pb2.ChatMessage(role=m.role, content=m.text(i))
            if m.name is not None:
                msg.name = m.name
            out.append(msg)
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=1, le=UINT32)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _check(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompt_input(self) -> str | list[int]:
        """The one prompt: text or token ids (batches of prompts are refused)."""
        p = self.prompt
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]
        if isinstance(p, str):
            return p
        if p and all(isinstance(x, int) for x in p):
            return list(p)  # type: ignore[arg-type]
        if not p:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        raise InvalidRequest("only one prompt per request is supported", param="prompt")


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
