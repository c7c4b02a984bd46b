"""The mesh against vLLM's own OpenAI server, measured by vLLM's own load generator.

`python -m bench` (or `infermesh bench`, `make bench`) runs it; see
`bench/compare/run.py` for the scenarios and docs/benchmarks/vs-vllm.md for
the results.
"""
