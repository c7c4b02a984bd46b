"""Debian's prometheus package (prometheus and promtool), installed if missing as `make deps` does."""

from __future__ import annotations

import os
import shutil
import subprocess


def ensure_prometheus() -> tuple[str, str]:
    """Paths of `prometheus` and `promtool`."""
    if not (shutil.which("prometheus") and shutil.which("promtool")) and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"], env=env,
                       check=False, timeout=600, capture_output=True)
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert prometheus and promtool, "Debian's prometheus package is needed: make deps (apt-get install prometheus)"
    return prometheus, promtool
