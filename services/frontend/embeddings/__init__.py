"""The embeddings endpoint: `protocol.py` (request model), `serving.py` (the response body), `router.py`."""
