"""The frontend: OpenAI's HTTP API and the public gRPC API over the mesh.

- one folder per HTTP endpoint family, each `protocol.py` (request models), `serving.py`
  (response bodies and chunks) and `router.py` (its routes, declared once):
  `chat/`, `completions/`, `models/`, `system/` (health, metrics, OpenAPI)
- `openai/`: what the OpenAI endpoints share (sampling fields, the whole/SSE flow, formatting, SSE)
- `request/`: the request path every API shares: prepare (limits, render, context window),
  attempts (admission, worker calls, migration), the output buffer, detokenizer, stop strings
- `app.py` (the HTTP dispatcher over the route table), `routes.py` (the table's types),
  `openapi.py`, `grpc_api.py` (infermesh.v1.Inference)
- `backends.py` (clients of the other tiers), `auth.py` (API keys), `drain.py`, `metrics.py`,
  `main.py` (`infermesh frontend`)
"""
