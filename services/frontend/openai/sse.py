"""Server-sent events: the `text/event-stream` response as a plain ASGI app, and its fixed events.

Starlette's StreamingResponse runs every stream in an anyio task group (one
task writes, one listens for the client going away). `EventStream` writes from
the request's own task and watches for the disconnect in one plain task that
only sets `gone` and calls `on_gone` (the body wakes up, sees `gone` and ends).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable

from infermesh.common.errors import error_body
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
# The same headers as StreamingResponse(media_type="text/event-stream", headers=SSE_HEADERS).
_RAW_HEADERS = StreamingResponse(iter(()), media_type="text/event-stream", headers=SSE_HEADERS).raw_headers
_END = {"type": "http.response.body", "body": b"", "more_body": False}


class EventStream:
    """Streams the chunks `body(stream)` yields; `stream.gone` once the client disconnected."""

    status_code = 200

    def __init__(self, body: Callable[[EventStream], AsyncIterator[bytes]],
                 on_gone: Callable[[], None] | None = None, headers: dict[str, str] | None = None) -> None:
        self.body = body
        self.on_gone = on_gone
        self.gone = False
        self.raw_headers = _RAW_HEADERS + [(k.encode("latin-1"), v.encode("latin-1"))
                                           for k, v in (headers or {}).items()]

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self.on_gone is not None:
            self.on_gone()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watcher = asyncio.get_running_loop().create_task(self._watch(receive))
        chunks = self.body(self)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for chunk in chunks:
                if self.gone:
                    break
                if chunk:  # an empty chunk would write nothing
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not self.gone:
                await send(_END)
        finally:
            watcher.cancel()
            await chunks.aclose()  # type: ignore[attr-defined]


def error_event(exc: BaseException, request_id: str = "") -> bytes:
    """A stream that failed after it started ends with this event, then `[DONE]`."""
    return b"data: " + json.dumps(error_body(exc, request_id)).encode() + b"\n\n"
