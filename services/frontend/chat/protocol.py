"""The request model of `POST /v1/chat/completions`."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from infermesh.common.catalog import RequestFacts
from infermesh.common.errors import InvalidRequest
from infermesh.frontend.openai.protocol import OpenAIModel, SamplingFields, limit
from infermesh.frontend.openai.structured import StructuredFields
from infermesh.frontend.request.constraints import ToolPlan
from infermesh.v1 import common_pb2
from pydantic import Field, model_validator


class ContentPart(OpenAIModel):
    type: str
    text: str | None = None


class FunctionCall(OpenAIModel):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCallParam(OpenAIModel):
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(OpenAIModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

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


class FunctionDef(OpenAIModel):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(OpenAIModel):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(OpenAIModel):
    name: str


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(StructuredFields, SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, limit("max_tokens")] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, limit("logprobs")] | None = None
    add_generation_prompt: bool = True
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

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
            for call in m.tool_calls or ():
                msg.tool_calls.append(common_pb2.ToolCall(id=call.id, name=call.function.name,
                                                          arguments=call.function.arguments))
            if m.tool_call_id is not None:
                msg.tool_call_id = m.tool_call_id
            out.append(msg)
        return out

    def tool_protos(self) -> list[common_pb2.Tool]:
        return [common_pb2.Tool(name=t.function.name, description=t.function.description or "",
                                parameters=json.dumps(t.function.parameters) if t.function.parameters is not None
                                else "", strict=bool(t.function.strict))
                for t in self.tools or ()]

    def tool_choice_proto(self) -> common_pb2.ToolChoice | None:
        choice = self.tool_choice
        if choice is None:
            return None
        if isinstance(choice, str):
            return common_pb2.ToolChoice(mode=choice)
        return common_pb2.ToolChoice(mode="function", function=choice.function.name)

    def tool_plan(self) -> ToolPlan:
        """The tools, tool_choice and structured-output fields, checked, as the request path takes them."""
        return ToolPlan.of(self.tool_protos(), self.tool_choice_proto(), self.parallel_tool_calls,
                           self.structured())

    def route_facts(self, tier: str | None) -> RequestFacts:
        """What a catalog route's rules read of this request (the rendered length is added after rendering)."""
        users = [m.text(i) for i, m in enumerate(self.messages) if m.role == "user"]
        return RequestFacts(turns=len(users), tools=bool(self.tools), response_format=self.structured_response,
                            text="\n".join(users), tier=tier)
