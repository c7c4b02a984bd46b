"""One supervised child process: its own process group, its log file, its restarts.

Each child runs in a new session (so a Ctrl-C in the terminal reaches only the
supervisor, which then stops the children in order) and is always killed as a
whole group at the end, so helpers it spawned (vLLM's engine core) go too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

Ready = Callable[[], bool]

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 30.0
# A child that stayed up this long starts its backoff over.
BACKOFF_RESET_AFTER = 60.0


class Child:
    """A service (or Envoy) as a child process."""

    def __init__(self, name: str, tier: str, argv: Sequence[str], log_path: Path, ready: Ready,
                 env: dict[str, str], ports: Sequence[int] = ()) -> None:
        self.name = name
        self.tier = tier
        self.argv = list(argv)
        self.log_path = log_path
        self.ready = ready
        self.env = env
        self.ports = list(ports)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.healthy = False
        self.restarts = 0
        self.backoff = BACKOFF_FIRST
        self.restart_at: float | None = None

    # -- running -------------------------------------------------------------

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"--- infermesh up: starting {self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                      f"{' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(self.argv, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.monotonic()
        self.healthy = False
        self.restart_at = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def check_ready(self) -> bool:
        """Polls the readiness check (once) and remembers the answer."""
        self.healthy = self.running() and self.ready()
        return self.healthy

    # -- crashes and restarts ------------------------------------------------

    def schedule_restart(self, now: float) -> float:
        """Records a crash; returns the delay before the restart."""
        if self.started_at and now - self.started_at > BACKOFF_RESET_AFTER:
            self.backoff = BACKOFF_FIRST
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.restart_at = now + delay
        self.restarts += 1
        self.healthy = False
        return delay

    # -- stopping --------------------------------------------------------------

    def terminate(self) -> None:
        """SIGTERM to the service itself: it drains, then exits."""
        if self.running():
            assert self.proc is not None
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill_group(self) -> None:
        """SIGKILL to the whole process group (also what is left after a clean exit)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def log_tail(self, lines: int = 20) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])
