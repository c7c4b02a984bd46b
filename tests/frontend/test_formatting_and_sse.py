"""Response formats from plain results, and the SSE response as an ASGI app, in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from infermesh.common.errors import Overloaded, Unavailable
from infermesh.frontend.chat.serving import ChatFormat
from infermesh.frontend.completions.serving import CompletionFormat
from infermesh.frontend.openai.sse import DONE, EventStream, error_event
from infermesh.frontend.request.detokenizer import TokenizerModel
from infermesh.frontend.request.output import ChoiceResult, Delta, Result, Usage
from infermesh.v1 import common_pb2


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> TokenizerModel:
    return TokenizerModel("m", (model_dir / "tokenizer.json").read_bytes(), [2])


def events(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().split("\n\n") if line.startswith("data: {")]


def test_chat_chunks_and_response_are_openai_shaped(tokenizer: TokenizerModel) -> None:
    fmt = ChatFormat("chatcmpl-1", 1700000000, "m", tokenizer, logprobs=True)
    opening = events(fmt.start(2))
    assert [e["choices"][0]["delta"] for e in opening] == [{"role": "assistant", "content": ""}] * 2
    lp = [common_pb2.TokenLogprob(token_id=42, logprob=-0.5, top=[common_pb2.TopLogprob(token_id=42, logprob=-0.5)])]
    chunk = events(fmt.chunks([Delta(1, 'say "hi"\n', [42], lp, ""), Delta(0, "", [], [], "length")]))
    assert chunk[0]["object"] == "chat.completion.chunk" and chunk[0]["id"] == "chatcmpl-1"
    assert chunk[0]["choices"][0] == {"index": 1, "delta": {"content": 'say "hi"\n'}, "finish_reason": None,
                                      "logprobs": {"content": [{"token": tokenizer.token_text(42), "logprob": -0.5,
                                                                "bytes": list(tokenizer.token_text(42).encode()),
                                                                "top_logprobs": [{"token": tokenizer.token_text(42),
                                                                                  "logprob": -0.5,
                                                                                  "bytes": list(tokenizer.token_text(
                                                                                      42).encode())}]}]}}
    assert chunk[1]["choices"][0]["delta"] == {} and chunk[1]["choices"][0]["finish_reason"] == "length"
    usage = events(fmt.usage_chunk(Usage(5, 3, 2)))[0]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 5, "completion_tokens": 3,
                                                         "total_tokens": 8,
                                                         "prompt_tokens_details": {"cached_tokens": 2}}
    body = fmt.response(Result([ChoiceResult(0, "Paris.", "stop")], Usage(5, 2)))
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                       "content": "Paris."}
    assert body["choices"][0]["logprobs"] == {"content": []} and body["usage"]["total_tokens"] == 7


def test_completion_logprobs_carry_text_offsets_across_chunks(tokenizer: TokenizerModel) -> None:
    fmt = CompletionFormat("cmpl-1", 1, "m", tokenizer, logprobs=True)
    ids = tokenizer.tokenizer.encode(" the capital", add_special_tokens=False).ids
    lps = [common_pb2.TokenLogprob(token_id=t, logprob=-1.0) for t in ids]
    first = events(fmt.chunks([Delta(0, "x", ids[:1], lps[:1], "")]))[0]["choices"][0]["logprobs"]
    second = events(fmt.chunks([Delta(0, "y", ids[1:], lps[1:], "stop")]))[0]["choices"][0]
    assert first["text_offset"] == [0]
    assert second["logprobs"]["text_offset"][0] == len(tokenizer.token_text(ids[0]))
    assert second["finish_reason"] == "stop" and second["text"] == "y"


def test_an_error_event_hides_server_side_details() -> None:
    body = json.loads(error_event(Unavailable("worker 10.0.0.1:50060 gone"), "rid-9")[6:])
    assert "10.0.0.1" not in body["error"]["message"] and "rid-9" in body["error"]["message"]
    body = json.loads(error_event(Overloaded("queue of m is full"))[6:])
    assert body["error"]["message"] == "queue of m is full" and body["error"]["code"] == "overloaded"


async def test_event_stream_writes_chunks_and_stops_when_the_client_goes_away() -> None:
    sent: list[dict] = []
    disconnect = asyncio.Event()
    produced: list[int] = []
    closed = asyncio.Event()

    async def body(stream: EventStream) -> AsyncIterator[bytes]:
        try:
            for i in range(1000):
                produced.append(i)
                yield f"data: {i}\n\n".encode()
                if i == 2:
                    disconnect.set()
                await asyncio.sleep(0.01)
        finally:
            closed.set()

    async def receive() -> dict:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    gone: list[bool] = []
    stream = EventStream(body, on_gone=lambda: gone.append(True))
    await asyncio.wait_for(stream({"type": "http"}, receive, send), 5)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert (b"content-type", b"text/event-stream; charset=utf-8") in sent[0]["headers"]
    assert stream.gone and gone == [True] and closed.is_set()
    assert len(produced) < 10  # the body stopped soon after the client left
    assert not any(m.get("more_body") is False for m in sent)  # nothing is finished for a gone client


async def test_event_stream_ends_the_body_when_done() -> None:
    sent: list[dict] = []

    async def body(stream: EventStream) -> AsyncIterator[bytes]:
        yield b""  # empty chunks are not written
        yield DONE

    never = asyncio.Event()

    async def receive() -> dict:
        await never.wait()
        return {}

    async def send(message: dict) -> None:
        sent.append(message)

    await EventStream(body)({"type": "http"}, receive, send)
    assert [m.get("body") for m in sent[1:]] == [DONE, b""] and sent[-1]["more_body"] is False
