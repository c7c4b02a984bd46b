"""Runs the mesh's processes: start in order gated on health, restart, drain.

Tiers start one after another (tokenizer, scheduler, workers, frontends,
Envoy), each only once every child of the one before is ready. While running,
a child that exits is restarted after a backoff (1 s, 2 s, 4 s, ... 30 s). On
SIGINT or SIGTERM the tiers stop in the drain order: frontends first (they
finish their streams), then workers, scheduler, tokenizer and Envoy; each gets
SIGTERM, then its whole process group SIGKILL after the grace period. A second
Ctrl-C skips the wait.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType

from infermesh.supervisor.children import Child

Say = Callable[[str], None]

PROGRESS_EVERY = 10.0
POLL = 0.2
STOP_ORDER = ("frontend", "worker", "scheduler", "tokenizer", "envoy")


class StartupFailed(Exception):
    """A child could not start; the message says which and why."""


class Supervisor:
    def __init__(self, tiers: Sequence[tuple[str, list[Child]]], say: Say, *, start_timeout: float,
                 grace_period: float, hints: dict[str, str] | None = None,
                 reload_tiers: Sequence[str] = ()) -> None:
        self.tiers = list(tiers)
        self.reload_tiers = tuple(reload_tiers)  # the children that reload their catalog on SIGHUP
        self.say = say
        self.start_timeout = start_timeout
        self.grace_period = grace_period
        self.hints = hints or {}
        self.stop_requested = False
        self.force = False
        self.started = time.monotonic()

    @property
    def children(self) -> list[Child]:
        return [child for _, tier in self.tiers for child in tier]

    # -- signals -------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        if self.reload_tiers:
            signal.signal(signal.SIGHUP, self._on_hup)

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        """SIGHUP reloads the catalog: passed on to the services that read it (not to the workers, whose
        options only a restart changes)."""
        for child in self.children:
            pid = child.pid
            if child.tier in self.reload_tiers and pid is not None and child.running():
                try:
                    os.kill(pid, signal.SIGHUP)
                except ProcessLookupError:
                    pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_requested:
            self.force = True
        self.stop_requested = True

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # -- start ---------------------------------------------------------------

    def start_all(self) -> bool:
        """Starts every tier in order; False when a stop was requested meanwhile.
        Raises StartupFailed when a child exits or times out before it is ready."""
        for label, tier in self.tiers:
            if self.stop_requested:
                return False
            began = time.monotonic()
            self.say(f"starting {label} ...")
            for child in tier:
                child.start()
            if not self._wait_ready(label, tier):
                return False
            self.say(f"  ready: {label} ({time.monotonic() - began:.0f} s)")
        return not self.stop_requested

    def _wait_ready(self, label: str, tier: list[Child]) -> bool:
        began = time.monotonic()
        next_progress = began + PROGRESS_EVERY
        while not self.stop_requested:
            waiting = [child for child in tier if not child.healthy]
            for child in waiting:
                if not child.running():
                    raise StartupFailed(
                        f"{child.name} exited with code {child.exit_code()} before it was ready; "
                        f"the end of its log ({child.log_path}):\n{child.log_tail()}")
                child.check_ready()
            waiting = [child for child in waiting if not child.healthy]
            if not waiting:
                return True
            now = time.monotonic()
            if now - began > self.start_timeout:
                names = ", ".join(c.name for c in waiting)
                raise StartupFailed(f"{names} not ready within {self.start_timeout:.0f} s; see "
                                    f"{waiting[0].log_path}:\n{waiting[0].log_tail()}")
            if now >= next_progress:
                hint = self.hints.get(label, "")
                self.say(f"  waiting for {', '.join(c.name for c in waiting)}: {now - began:.0f} s"
                         + (f" ({hint})" if hint else ""))
                next_progress = now + PROGRESS_EVERY
            time.sleep(POLL)
        return False

    # -- run -------------------------------------------------------------------

    def monitor(self) -> None:
        """Restarts children that exit, until a stop is requested."""
        next_check = 0.0
        while not self.stop_requested:
            now = time.monotonic()
            for child in self.children:
                self._tend(child, now, check_health=now >= next_check)
            if now >= next_check:
                next_check = now + 1.0
            time.sleep(POLL)

    def _tend(self, child: Child, now: float, check_health: bool) -> None:
        if child.restart_at is None and not child.running():
            code = child.exit_code()
            child.kill_group()
            delay = child.schedule_restart(now)
            self.say(f"{child.name} exited (code {code}); restarting in {delay:.0f} s "
                     f"(restart {child.restarts}; log {child.log_path})")
        elif child.restart_at is not None and now >= child.restart_at:
            if all(_port_released(port) for port in child.ports):
                child.start()
                self.say(f"{child.name} restarted (pid {child.pid})")
            else:
                child.restart_at = now + 0.5
        elif child.running() and not child.healthy and check_health and child.check_ready():
            self.say(f"{child.name} is ready again ({now - child.started_at:.0f} s after its restart)")

    # -- stop ------------------------------------------------------------------

    def stop_all(self) -> None:
        """Drains and stops every child in STOP_ORDER; nothing is left running."""
        by_kind: dict[str, list[Child]] = {}
        for child in self.children:
            by_kind.setdefault(child.tier, []).append(child)
        for kind in STOP_ORDER:
            group = [c for c in by_kind.pop(kind, []) if c.proc is not None]
            self._stop_group(kind, group)
        for rest in by_kind.values():
            self._stop_group("other", rest)

    def _stop_group(self, kind: str, group: list[Child]) -> None:
        running = [c for c in group if c.running()]
        if running:
            self.say(f"stopping {kind}{'s' if len(running) > 1 else ''} "
                     f"({', '.join(c.name for c in running)}) ...")
        for child in running:
            child.terminate()
        deadline = time.monotonic() + self.grace_period + 5.0
        while any(c.running() for c in running) and time.monotonic() < deadline and not self.force:
            time.sleep(POLL)
        for child in group:
            if child.running():
                self.say(f"  {child.name} did not stop in time: killed")
            child.kill_group()


def _port_released(port: int) -> bool:
    from infermesh.supervisor.ports import port_free

    return port_free("127.0.0.1", port)
