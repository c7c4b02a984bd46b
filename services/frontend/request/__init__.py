"""The request path after the API has parsed a request, shared by the HTTP and gRPC APIs.

- `prepare.py`: limits, render, context window, prefix hashes -> `PreparedRequest`
- `attempts.py`: admission and attempts (lease, worker call, release, exclusion, migration)
- `output.py`: the output buffer (what the reader has not taken yet) and plain results
- `generation.py`: one request in flight (`start_generation`), tying the three together
- `interfaces.py`: what the path needs of the other tiers (faked in unit tests)
- `detokenizer.py`, `stop.py`: incremental decoding and stop strings
"""
