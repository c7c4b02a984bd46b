"""The request model of `POST /v1/chat/completions`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from infermesh.common.catalog import RequestFacts
from infermesh.common.errors import InvalidRequest
from infermesh.frontend.openai.protocol import OpenAIModel, SamplingFields, limit
from infermesh.v1 import common_pb2
from pydantic import Field, model_validator


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class ChatMessage(OpenAIModel):
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


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, limit("max_tokens")] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, limit("logprobs")] | None = None
    add_generation_prompt: bool = True
    # Read by the catalog's routes (a rule may send requests with tools or a structured response elsewhere).
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_params(self) -> dict[str, str]:
        names = {"logprobs": "top_logprobs"}
        if self.max_completion_tokens is not None:
            names["max_tokens"] = "max_completion_tokens"
        return names

    def chat_messages(self) -> list[common_pb2.ChatMessage]:
        out = []
        for i, m in enumerate(self.messages):
            msg = common_pb2.ChatMessage(role=m.role, content=m.text(i))
            if m.name is not None:
                msg.name = m.name
            out.append(msg)
        return out

    def route_facts(self, tier: str | None) -> RequestFacts:
        """What a catalog route's rules read of this request (the rendered length is added after rendering)."""
        users = [m.text(i) for i, m in enumerate(self.messages) if m.role == "user"]
        structured = self.response_format is not None and self.response_format.get("type", "text") != "text"
        return RequestFacts(turns=len(users), tools=bool(self.tools), response_format=structured,
                            text="\n".join(users), tier=tier)
