"""`infermesh bench`: the benchmarks live in the repository's `bench/`, next to `services/`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    root = Path(__file__).resolve().parents[1]
    if not (root / "bench" / "__main__.py").is_file():
        print("infermesh bench: the benchmarks ship with the source repository (bench/), not with the package; "
              "run it from a checkout (`make bench`)", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from bench.__main__ import main as bench_main

    return int(bench_main(list(sys.argv[1:] if argv is None else argv)) or 0)
