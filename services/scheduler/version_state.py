"""The scheduler's memory of model versions across restarts: rollbacks and rollout starts in one JSON file
(`--state-file`), kept per catalog file and version definition (`infermesh.scheduler.versions`)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class StateFile:
    """Rollbacks and rollout starts that outlive the process: JSON, written whole and atomically.

    Kept per catalog file (its resolved path) and version definition (fingerprint); entries of a catalog that
    no longer lists the definition are dropped when it is applied.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.data: dict[str, dict[str, dict[str, Any]]] = {}
        try:
            loaded = json.loads(self.path.read_text())
            if isinstance(loaded, dict) and isinstance(loaded.get("catalogs"), dict):
                self.data = loaded["catalogs"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as exc:
            logger.warning("version state %s unreadable (%s): starting without it", self.path, exc)

    def get(self, catalog: str, fingerprint: str) -> dict[str, Any]:
        return dict(self.data.get(catalog, {}).get(fingerprint, {}))

    def put(self, catalog: str, fingerprint: str, record: dict[str, Any]) -> None:
        self.data.setdefault(catalog, {})[fingerprint] = record
        self.save()

    def keep_only(self, catalog: str, fingerprints: set[str]) -> None:
        entries = self.data.get(catalog, {})
        gone = [fp for fp in entries if fp not in fingerprints]
        stale = [c for c in self.data if c != catalog and c.startswith("/") and not os.path.exists(c)]
        for fp in gone:
            del entries[fp]
        for c in stale:
            del self.data[c]
        if gone or stale:
            self.save()

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps({"catalogs": self.data}, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        except OSError as exc:
            logger.error("version state %s cannot be written (%s): a restart forgets rollbacks", self.path, exc)
