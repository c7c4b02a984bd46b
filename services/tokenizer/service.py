"""The Tokenizer gRPC servicer: decodes requests, calls ModelTokenizer, encodes replies."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from infermesh.common.errors import InvalidRequest
from infermesh.common.metrics import LATENCY_BUCKETS, observe_call
from infermesh.tokenizer.models import ModelRegistry, ModelTokenizer
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from prometheus_client import Counter, Histogram

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Prompts up to this many characters (a few hundred tokens: ~0.1-0.3 ms of work) are
# encoded on the event loop: handing them to a thread costs more CPU than the encoding.
INLINE_CHARS = 2048

REQUESTS = Counter("infermesh_tokenizer_requests_total", "Tokenizer calls by method and gRPC code.",
                   ["method", "code"])
SECONDS = Histogram("infermesh_tokenizer_request_seconds", "Tokenizer call latency.", ["method"],
                    buckets=LATENCY_BUCKETS)
TOKENS = Counter("infermesh_tokenizer_tokens_total", "Prompt tokens rendered.", ["model"])
METHODS = tuple(m.name for m in tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].methods)


class TokenizerService(tokenizer_pb2_grpc.TokenizerServicer):
    """Tokenization runs in a thread pool so the event loop never blocks on it."""

    def __init__(self, registry: ModelRegistry, workers: int = 8) -> None:
        self.registry = registry
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tokenize")
        self.created = int(time.time())
        self.cores = os.cpu_count() or 1
        self.in_flight = 0
        # Labelled TOKENS children, by model: every series at zero from start, not from its first call.
        self._tokens: dict[str, Any] = {name: TOKENS.labels(model=name) for name in registry.models}
        for method in METHODS:
            REQUESTS.labels(method=method, code="OK")
            SECONDS.labels(method=method)

    async def _run(self, fn: Callable[..., T], *args: Any, inline: bool = False) -> T:
        if inline:
            return fn(*args)
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)
        finally:
            self.in_flight -= 1

    @property
    def idle_cores(self) -> bool:
        """Whether one request may spread over several cores (no one else needs them)."""
        return self.in_flight < self.cores

    def _model(self, name: str) -> ModelTokenizer:
        if not name:
            raise InvalidRequest("model is required", param="model")
        return self.registry.get(name)

    async def Render(self, request: tokenizer_pb2.RenderRequest, context: Any) -> tokenizer_pb2.RenderResponse:
        with observe_call(REQUESTS, SECONDS, "Render"):
            model = self._model(request.model)
            has_prompt = request.HasField("prompt")
            if has_prompt and request.messages:
                raise InvalidRequest("send either messages or prompt, not both", param="messages")
            if has_prompt:
                add_special = request.add_special_tokens if request.HasField("add_special_tokens") else True
                prompt = request.prompt
                ids = await self._run(model.encode, prompt, add_special, self.idle_cores,
                                      inline=len(prompt) <= INLINE_CHARS)
                if not ids:
                    raise InvalidRequest("prompt must not be empty", param="prompt")
            else:
                if not request.messages:
                    raise InvalidRequest("messages must not be empty", param="messages")
                messages = [_message_dict(m) for m in request.messages]
                tools = [_tool_dict(t) for t in request.tools]
                add_gen = request.add_generation_prompt if request.HasField("add_generation_prompt") else True
                short = not tools and sum(len(m["content"]) for m in messages) <= INLINE_CHARS
                ids = await self._run(model.render_chat, messages, add_gen, self.idle_cores, tools, inline=short)
            counter = self._tokens.get(model.name)
            if counter is None:  # a model the catalog added after the start
                counter = self._tokens[model.name] = TOKENS.labels(model=model.name)
            counter.inc(len(ids))
            return tokenizer_pb2.RenderResponse(token_ids=ids)

    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context: Any) -> tokenizer_pb2.EncodeResponse:
        with observe_call(REQUESTS, SECONDS, "Encode"):
            model = self._model(request.model)
            texts = list(request.texts)
            # Short batches (an embeddings request of a few sentences) on the event loop, as short prompts.
            items = await self._run(model.encode_batch, texts, request.add_special_tokens,
                                    inline=sum(len(t) for t in texts) <= INLINE_CHARS)
            return tokenizer_pb2.EncodeResponse(items=[common_pb2.TokenIds(ids=ids) for ids in items])

    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context: Any) -> tokenizer_pb2.DecodeResponse:
        with observe_call(REQUESTS, SECONDS, "Decode"):
            model = self._model(request.model)
            items = [list(item.ids) for item in request.items]
            texts = await self._run(model.decode_batch, items, request.skip_special_tokens)
            return tokenizer_pb2.DecodeResponse(texts=texts)

    async def GetTokenizer(self, request: tokenizer_pb2.GetTokenizerRequest,
                           context: Any) -> tokenizer_pb2.TokenizerDefinition:
        with observe_call(REQUESTS, SECONDS, "GetTokenizer"):
            model = self._model(request.model)
            definition = tokenizer_pb2.TokenizerDefinition(
                model=model.name, tokenizer_json=model.tokenizer_json, eos_token_ids=model.eos_token_ids,
                sha256=model.sha256)
            if model.bos_token_id is not None:
                definition.bos_token_id = model.bos_token_id
            return definition

    async def ListModels(self, request: common_pb2.ListModelsRequest, context: Any) -> common_pb2.ListModelsResponse:
        with observe_call(REQUESTS, SECONDS, "ListModels"):
            return common_pb2.ListModelsResponse(models=[
                common_pb2.ModelCard(id=m.name, owned_by="infermesh", created=self.created)
                for m in self.registry.models.values()])


def _message_dict(message: common_pb2.ChatMessage) -> dict[str, Any]:
    """A message as chat templates read it (transformers' convention: a call's arguments as an object)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.HasField("name"):
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.name, "arguments": _json_or_text(c.arguments)}}
                             for c in message.tool_calls]
    if message.HasField("tool_call_id"):
        out["tool_call_id"] = message.tool_call_id
    return out


def _tool_dict(tool: common_pb2.Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    function["parameters"] = _json_or_text(tool.parameters) if tool.parameters else {"type": "object",
                                                                                       "properties": {}}
    return {"type": "function", "function": function}


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
