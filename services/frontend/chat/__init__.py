"""The chat completions endpoint: `protocol.py` (request model), `serving.py` (bodies, chunks), `router.py`."""
