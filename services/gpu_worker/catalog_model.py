"""`infermesh worker --catalog FILE --model NAME`: a worker of one catalog model, its options from the catalog.

With a catalog, `--model` may be a name (or alias) of the catalog instead of a directory: the worker then
serves that model from its weights (`NAME=DIR`), with its engine options and task, as `infermesh up` and
the Kubernetes manifests start it. A version, `NAME@VERSION` (`chat@v2`, `chat-small@v2`), is served under
`chat@v2` with that version's weights and options (the model's engine options under its own); a versioned
model's bare name means its stable version (workers serve versions: the scheduler routes `chat` to them).
Flags given on the command line still win over the catalog's (they come after them). Both may also come from
the environment (`INFERMESH_CATALOG`, `INFERMESH_MODEL`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence


def _value(argv: Sequence[str], flag: str, environ: Mapping[str, str], env: str) -> str:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return environ.get(env, "")


def expand(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """`argv` with the catalog model's options put first (unchanged when `--model` is not a catalog name)."""
    environ = os.environ if environ is None else environ
    catalog_path = _value(argv, "--catalog", environ, "INFERMESH_CATALOG")
    name = _value(argv, "--model", environ, "INFERMESH_MODEL")
    if not catalog_path or not name or "=" in name or os.path.isdir(name):
        return list(argv)
    from infermesh.common.catalog import load_catalog

    entry = load_catalog(catalog_path).lookup(name)
    from infermesh.common.catalog import ModelEntry

    if isinstance(entry, ModelEntry) and entry.versions:
        entry = entry.stable_version
    if not isinstance(entry, ModelEntry):
        raise SystemExit(f"infermesh worker: --model {name!r} is not a model of the catalog {catalog_path} "
                         "(nor a directory)")
    task = ["--task", entry.task] if entry.task != "generate" else []
    rest, skip = [], False
    for arg in argv:  # the bare name goes; NAME=DIR takes its place
        if skip:
            skip = False
            continue
        if arg == "--model":
            skip = True
            continue
        if not arg.startswith("--model="):
            rest.append(arg)
    return [*entry.engine.worker_args(), *task, "--model", entry.spec(), *rest]
