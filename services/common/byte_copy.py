"""Copying model files with a progress meter: a directory tree, or parts joined into one checked file.

`infermesh prepare-model` reports on stderr, so that stdout stays clean for `--print-path`. On a
terminal the meter is one line redrawn in place; in a log it is a line every quarter.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

CHUNK = 4 << 20


class IntegrityError(RuntimeError):
    """A source file is not the one expected (wrong size or sha256): nothing is written from it."""


def say(message: str) -> None:
    print(f"[prepare-model] {message}", file=sys.stderr, flush=True)


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


class Progress:
    """Counts bytes towards a known total and shows how far it got."""

    def __init__(self, label: str, total: int, stream: IO[str] | None = None) -> None:
        self.label, self.total, self.done = label, max(total, 1), 0
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.started = time.monotonic()
        self._shown = -1

    def advance(self, n: int) -> None:
        self.done += n
        percent = min(100, self.done * 100 // self.total)
        step = percent if self.live else percent // 25 * 25
        if step != self._shown:
            self._shown = step
            self._show(percent)

    def _show(self, percent: int) -> None:
        rate = self.done / max(time.monotonic() - self.started, 1e-6)
        if self.live:
            bar = "#" * (percent // 4)
            self.stream.write(f"\r[prepare-model]   {self.label} [{bar:<25}] {percent:3d}% "
                              f"{megabytes(self.done)} / {megabytes(self.total)} ({rate / 1e6:,.0f} MB/s)")
            if percent == 100:
                self.stream.write("\n")
        else:
            self.stream.write(f"[prepare-model]   {self.label}: {percent}% of {megabytes(self.total)}\n")
        self.stream.flush()


def tree_files(root: Path) -> dict[str, int]:
    """Every file under `root` (relative POSIX path -> size), in a stable order."""
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def copy_tree(source: Path, dest: Path, label: str = "copying") -> dict[str, int]:
    """Copies every file of `source` into `dest` (created), checking each size; returns `tree_files`."""
    files = tree_files(source)
    progress = Progress(label, sum(files.values()))
    for name, size in files.items():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(source / name, "rb") as src, open(target, "wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                progress.advance(len(chunk))
        shutil.copystat(source / name, target)
        if target.stat().st_size != size:
            raise IntegrityError(f"{target} has {target.stat().st_size} bytes after copying, not {size}")
    return files


def join_parts(parts: Sequence[Path], dest: Path, *, size: int, sha256: str, label: str = "joining") -> None:
    """Concatenates `parts` into `dest`, refusing (and removing `dest`) unless the result has exactly
    `size` bytes and the given sha256. The sizes are checked before a byte is copied."""
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise IntegrityError(f"missing parts: {', '.join(missing)}")
    found = sum(p.stat().st_size for p in parts)
    if found != size:
        raise IntegrityError(f"the {len(parts)} parts hold {found:,} bytes, not the expected {size:,}")
    digest = hashlib.sha256()
    progress = Progress(label, size)
    try:
        with open(dest, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while chunk := src.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        progress.advance(len(chunk))
        if digest.hexdigest() != sha256.lower():
            raise IntegrityError(f"the joined file has sha256 {digest.hexdigest()}, not the expected {sha256}; "
                                 "the parts are not the ones this version was checked against")
        if dest.stat().st_size != size:
            raise IntegrityError(f"{dest} has {dest.stat().st_size:,} bytes after joining, not {size:,}")
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
