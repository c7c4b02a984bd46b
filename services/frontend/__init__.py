"""The frontend: OpenAI's HTTP API and the public gRPC API over the mesh.

- `protocol.py`: request models (chat, completions) and their sampling parameters
- `serving.py`: render and length checks, shared by both APIs; `generation.py`: admission,
  the worker's token stream, retries and migration, coalescing
- `detokenizer.py`, `stop.py`: incremental decoding and stop strings
- `completions_api.py` (HTTP handlers, SSE), `responses.py` (OpenAI bodies), `http_app.py` (routing),
  `grpc_api.py` (infermesh.v1.Inference), `openapi.py`
- `errors.py`: errors to HTTP statuses and OpenAI's body; `auth.py`: API keys; `backends.py`: clients
- `metrics.py`, `main.py` (`infermesh frontend`)
"""
