"""`python -m bench` (`make bench`, `infermesh bench`): the mesh against vLLM's own server.

    python -m bench [options]            the comparison (bench/compare/run.py; --help lists its options)
    python -m bench worker [options]     the worker benchmark (bench/worker_bench.py)
    python -m bench frontend [options]   the frontend benchmark (bench/frontend_bench.py)
    python -m bench scheduler [options]  the scheduler benchmark (bench/scheduler_bench.py)
    python -m bench tokenizer [options]  the tokenizer benchmark (bench/tokenizer_bench.py)
    python -m bench route [options]      a catalog route on a mixed workload (bench/route_bench.py)
    python -m bench embeddings [options] embeddings/s, the mesh against vLLM's server (bench/embeddings_bench.py)
    python -m bench canary [options]     time to roll back a bad canary on simulated workers (bench/canary_bench.py)
"""

from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

SERVICE_BENCHES = {"worker": "bench.worker_bench", "frontend": "bench.frontend_bench",
                   "scheduler": "bench.scheduler_bench", "tokenizer": "bench.tokenizer_bench",
                   "route": "bench.route_bench", "embeddings": "bench.embeddings_bench",
                   "canary": "bench.canary_bench"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # `infermesh bench` runs from the installed command, whose path does not hold the repository.
    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    if args and args[0] in SERVICE_BENCHES:
        module = importlib.import_module(SERVICE_BENCHES[args[0]])
        sys.argv = [f"python -m {module.__name__}", *args[1:]]  # some of them read sys.argv themselves
        if inspect.signature(module.main).parameters:
            return int(module.main(args[1:]) or 0)
        return int(module.main() or 0)
    if args and args[0] in ("compare", "vs-vllm"):
        args = args[1:]
    from bench.compare.run import main as compare

    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
