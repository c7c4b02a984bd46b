"""`infermesh up` as a child process of a test, on a free block of ports."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from infermesh.supervisor.ports import PortPlan, block_plan, ports_in_use


def free_block(workers: int, frontends: int) -> int:
    """A base port whose whole `--ports-from` block is free (below the ephemeral range)."""
    for _ in range(200):
        base = random.randrange(20000, 30000)
        plan = block_plan(base, workers, frontends)
        if not ports_in_use("127.0.0.1", plan.labelled()):
            return base
    raise RuntimeError("no free block of ports")


class UpProcess:
    def __init__(self, log_dir: Path, *extra: str, workers: int = 2, frontends: int = 1,
                 base: int | None = None) -> None:
        self.base = base or free_block(workers, frontends)
        self.plan: PortPlan = block_plan(self.base, workers, frontends)
        self.log_dir = log_dir
        self.out_path = log_dir / "up.out"
        self.args = ["up", "--engine", "sim", "--workers", str(workers), "--frontends", str(frontends),
                     "--ports-from", str(self.base), "--log-dir", str(log_dir), "--grace-period", "5", *extra]
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen_pids: set[int] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.plan.edge}"

    def start(self) -> UpProcess:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "infermesh.cli", *self.args], stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    def output(self) -> str:
        return self.out_path.read_text(errors="replace") if self.out_path.exists() else ""

    def wait_for(self, text: str, timeout: float = 120.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.output().count(text) >= count:
                self.record_pids()
                return
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"infermesh up exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.1)
        raise TimeoutError(f"{text!r} not printed within {timeout}s:\n{self.output()}")

    def wait_up(self, timeout: float = 120.0) -> UpProcess:
        self.wait_for("infermesh is up", timeout)
        return self

    def tree(self) -> list[psutil.Process]:
        assert self.proc is not None
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def record_pids(self) -> None:
        self.seen_pids.update(p.pid for p in self.tree())

    def child(self, service: str, port: int) -> psutil.Process:
        """The direct child running `infermesh SERVICE --port PORT`."""
        assert self.proc is not None
        for proc in psutil.Process(self.proc.pid).children():
            args = proc.cmdline()
            if "infermesh.cli" in args and args[args.index("infermesh.cli") + 1] == service \
                    and args[args.index("--port") + 1] == str(port):
                return proc
        raise LookupError(f"no child {service} on port {port}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def leftovers(self) -> list[int]:
        """Processes the supervisor ever ran that still exist (zombies of nobody's count too)."""
        left = []
        for pid in self.seen_pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left

    def cleanup(self) -> None:
        """Whatever happened in the test: nothing of this run stays behind."""
        self.record_pids()
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in self.seen_pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
