"""What the OpenAI HTTP endpoints share: the sampling fields (`protocol.py`), the request flow with its
whole and streamed responses (`serving.py`), response formatting (`formatting.py`) and SSE (`sse.py`)."""
