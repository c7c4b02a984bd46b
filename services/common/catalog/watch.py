"""The running catalog, and its reload: on SIGHUP, on a change of the file, or when asked.

A `CatalogHolder` holds the catalog a service runs with. `reload()` reads the
file again: a valid catalog replaces the running one and the listeners hear of
it (once per change of content: a file rewritten with the same bytes changes
nothing); an invalid one is refused with its `CatalogError`, logged, and the
running catalog stays. `install_sighup()` reloads on SIGHUP; `watch()` polls the
file's stat every few seconds and reloads when it changed (content compared by
SHA-256, so a `touch` reloads nothing). Nothing is read at import time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from infermesh.common.catalog.parse import load_catalog, parse_catalog
from infermesh.common.catalog.schema import Catalog, CatalogError, Problem

logger = logging.getLogger(__name__)

Listener = Callable[[Catalog], None]


@dataclass(frozen=True)
class ReloadResult:
    """What a reload did: `catalog` is the one running after it."""

    catalog: Catalog
    error: CatalogError | None = None  # the file was refused (the previous catalog stays)
    changed: bool = False  # a new catalog took effect


class CatalogHolder:
    """The current catalog of a service, reloadable from its file."""

    def __init__(self, catalog: Catalog, path: str | Path | None = None) -> None:
        self._catalog = catalog
        self.path = Path(path) if path else None
        self._listeners: list[Listener] = []
        self._lock = threading.Lock()
        self._seen_digest = catalog.digest  # of the last bytes tried, valid or not (reported once)
        self._seen_stat: tuple[int, int, int] | None = None

    @classmethod
    def open(cls, path: str | Path | None, *, model: str = "") -> CatalogHolder:
        """The catalog of `path` (raises CatalogError: a service does not start on an invalid catalog), or,
        without a path, the default mesh serving `model` (a `--model` value; empty: the default model)."""
        if not path:
            return cls(Catalog.default(model))
        holder = cls(Catalog.default(), path)
        holder._seen_stat = holder._stat()  # before reading: a change while it is read is seen by the next poll
        holder._catalog = load_catalog(path)
        holder._seen_digest = holder._catalog.digest
        return holder

    @property
    def current(self) -> Catalog:
        return self._catalog

    def add_listener(self, listener: Listener) -> Callable[[], None]:
        """Calls `listener(catalog)` after each new valid catalog took effect; returns its removal."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)
        return remove

    def reload(self) -> ReloadResult:
        """Reads the file again; a valid catalog takes effect, an invalid one is refused and the current stays."""
        if self.path is None:
            return ReloadResult(self._catalog)
        self._seen_stat = self._stat()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            error = CatalogError([_unreadable(self.path, exc)])
            logger.error("catalog %s refused, keeping the running one: %s", self.path, error)
            return ReloadResult(self._catalog, error)
        return self._take(data)

    def _take(self, data: bytes) -> ReloadResult:
        assert self.path is not None
        with self._lock:
            digest = hashlib.sha256(data).hexdigest()
            self._seen_digest = digest
            if digest == self._catalog.digest:
                return ReloadResult(self._catalog)
            try:
                catalog = parse_catalog(data, str(self.path), base_dir=self.path.resolve().parent)
            except CatalogError as error:
                logger.error("catalog %s refused, keeping the running one (%d problems):\n%s", self.path,
                             len(error.problems), error)
                return ReloadResult(self._catalog, error)
            self._catalog = catalog
            listeners = list(self._listeners)
        logger.info("catalog %s reloaded: %d models, %d routes, %d fallback chains (sha256 %s)", self.path,
                    len(catalog.models), len(catalog.routes), len(catalog.chains), catalog.digest[:12])
        for listener in listeners:
            try:
                listener(catalog)
            except Exception:
                logger.exception("a catalog listener failed")
        return ReloadResult(catalog, changed=True)

    def install_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> Callable[[], None]:
        """Reloads on SIGHUP (in the event loop's thread); returns the removal of the handler."""
        loop = loop or asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)

        def remove() -> None:
            loop.remove_signal_handler(signal.SIGHUP)
        return remove

    def _on_sighup(self) -> None:
        logger.info("SIGHUP: reloading the catalog %s", self.path or "(none: the default model)")
        result = self.reload()
        if result.error is None and not result.changed:
            logger.info("catalog %s unchanged", self.path or "(none)")

    async def watch(self, interval: float = 2.0) -> None:
        """Reloads whenever the file changes, checking every `interval` seconds, until cancelled."""
        if self.path is None:
            return
        while True:
            await asyncio.sleep(interval)
            await self.check_once()

    def start_watch(self, interval: float = 2.0) -> asyncio.Task[None]:
        """`watch()` as a task of the running loop (cancel it to stop)."""
        return asyncio.get_running_loop().create_task(self.watch(interval), name="catalog-watch")

    def follow(self, interval: float = 2.0) -> Callable[[], None]:
        """What a service does with its catalog file: reload on SIGHUP and on a change of the file (from the
        running loop). Returns the stop. Without a file, nothing to follow."""
        if self.path is None:
            return lambda: None
        remove = self.install_sighup()
        task = self.start_watch(interval)

        def stop() -> None:
            task.cancel()
            remove()
        return stop

    async def check_once(self) -> ReloadResult | None:
        """One poll: None when the file's stat is unchanged, else what reading it did."""
        if self.path is None:
            return None
        stat = self._stat()
        if stat == self._seen_stat:
            return None
        self._seen_stat = stat
        try:
            data = await asyncio.to_thread(self.path.read_bytes)
        except OSError as exc:
            logger.warning("catalog %s: %s; keeping the running one", self.path, _unreadable(self.path, exc))
            return ReloadResult(self._catalog, CatalogError([_unreadable(self.path, exc)]))
        if hashlib.sha256(data).hexdigest() == self._seen_digest:
            return ReloadResult(self._catalog)  # touched, or the same invalid bytes again
        return self._take(data)

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino) if st else None


def _unreadable(path: Path, exc: OSError) -> Problem:
    return Problem(str(path), 0, "", f"cannot read the catalog: {exc.strerror or exc}")
