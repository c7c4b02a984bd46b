"""CPU placement on machines without an accelerator.

vLLM's CPU backend binds the threads that run the model to some cores (by
default all but one, on a 2-core machine core 0) and leaves the rest for
"everything else". Everything else (the engine's scheduling loop, the worker's
gRPC threads, the frontend, the tokenizer, the scheduler, Envoy) floats over
every core unless told otherwise, so part of its CPU comes out of the model's
cores and slows every step. These helpers keep serving work on the cores the
model does not use:

- `plan(workers, cores)`: which cores each worker's model threads get and which
  are left for serving (`infermesh up`);
- `pin_tree(cpus)`: move this process's threads, and those of its children that
  vLLM did not bind, onto `cpus` (the worker, once its engine has started);
- `python -m infermesh.common.cpus --cpus LIST -- COMMAND...`: run a command
  (Envoy, a service) with its affinity set before it starts any thread.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class CpuListError(ValueError):
    pass


def parse(text: str) -> set[int]:
    """`0,2-3` -> {0, 2, 3} (the kernel's cpulist format)."""
    cpus: set[int] = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        low, dash, high = part.partition("-")
        try:
            a, b = int(low), int(high if dash else low)
        except ValueError:
            raise CpuListError(f"{text!r} is not a CPU list (like 1 or 0,2-3)") from None
        if a < 0 or b < a:
            raise CpuListError(f"{text!r} is not a CPU list (like 1 or 0,2-3)")
        cpus.update(range(a, b + 1))
    if not cpus:
        raise CpuListError(f"{text!r} names no CPU")
    return cpus


def to_text(cpus: Iterable[int]) -> str:
    """{0, 2, 3} -> `0,2-3`."""
    out: list[str] = []
    run: list[int] = []
    for cpu in sorted(set(cpus)):
        if run and cpu == run[-1] + 1:
            run.append(cpu)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [cpu]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def allowed() -> set[int]:
    """The cores this process may run on."""
    return set(os.sched_getaffinity(0))


def check(cpus: set[int]) -> str | None:
    """A problem with using `cpus` here, or None."""
    outside = cpus - allowed()
    if outside:
        return f"CPU(s) {to_text(outside)} are not available here (available: {to_text(allowed())})"
    return None


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (from /proc, Linux)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found.extend(int(x) for x in (task / "children").read_text().split())
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = children(pid)
    while todo:
        child = todo.pop()
        out.append(child)
        todo.extend(children(child))
    return out


def _affinity(pid: int) -> set[int] | None:
    try:
        return set(os.sched_getaffinity(pid))
    except OSError:
        return None


def pin_process(pid: int, cpus: set[int]) -> bool:
    """Sets the affinity of every thread of `pid` (threads started later inherit it from theirs)."""
    done = False
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            os.sched_setaffinity(int(task.name), cpus)
            done = True
        except OSError:
            continue
    return done


@dataclass(frozen=True)
class TreePlacement:
    model: set[int]  # cores the engine bound its model threads to
    serving: set[int]  # cores this process and the engine's unbound processes now run on
    pinned: list[int]  # pids moved


def bound_by_children(pid: int | None = None) -> set[int]:
    """Cores that processes under `pid` were bound to more narrowly than `pid` itself (the model's)."""
    pid = os.getpid() if pid is None else pid
    mine = _affinity(pid) or set()
    bound: set[int] = set()
    for child in descendants(pid):
        cores = _affinity(child)
        if cores is not None and cores < mine:
            bound |= cores
    return bound


def pin_tree(cpus: set[int] | None = None) -> TreePlacement | None:
    """Moves this process and its children that were not bound elsewhere onto `cpus`.

    `cpus=None` means "the cores the children's bound processes (the model) do not use";
    returns None, changing nothing, when there are no such cores.
    """
    me = os.getpid()
    mine = allowed()
    model = bound_by_children(me)
    target = (mine - model) if cpus is None else cpus
    if not target or (cpus is None and not model):
        return None
    pinned = []
    for pid in [me, *descendants(me)]:
        cores = _affinity(pid)
        if cores is not None and not cores < mine and pin_process(pid, target):
            pinned.append(pid)
    return TreePlacement(model=model, serving=target, pinned=pinned)


@dataclass(frozen=True)
class Plan:
    workers: list[set[int]]  # the model cores of each worker
    serving: set[int] | None  # the cores of everything else (None: no core to spare, leave it floating)


def plan(workers: int, cores: Sequence[int] | set[int]) -> Plan:
    """Gives each worker's model its own cores and keeps some for serving.

    One core in eight (at least one) is kept for serving when there are more cores than
    workers, like vLLM's own default on a single engine; the others are split into
    contiguous groups, one per worker. With no more cores than workers, workers share
    cores round-robin and nothing is reserved.
    """
    ordered = sorted(set(cores))
    if workers < 1 or not ordered:
        return Plan([], None)
    if len(ordered) <= workers:
        return Plan([{ordered[i % len(ordered)]} for i in range(workers)], None)
    reserve = min(max(1, len(ordered) // 8), len(ordered) - workers)
    model, serving = ordered[:len(ordered) - reserve], set(ordered[len(ordered) - reserve:])
    size, extra = divmod(len(model), workers)
    groups, start = [], 0
    for i in range(workers):
        end = start + size + (1 if i < extra else 0)
        groups.append(set(model[start:end]))
        start = end
    return Plan(groups, serving)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m infermesh.common.cpus --cpus LIST -- COMMAND ...`: exec COMMAND on LIST."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 4 or args[0] != "--cpus" or args[2] != "--":
        print("usage: python -m infermesh.common.cpus --cpus LIST -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    try:
        cpus = parse(args[1])
    except CpuListError as exc:
        print(f"infermesh.common.cpus: {exc}", file=sys.stderr)
        return 2
    problem = check(cpus)
    if problem:
        print(f"infermesh.common.cpus: {problem}", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, cpus)
    os.execvp(args[3], args[3:])


if __name__ == "__main__":
    sys.exit(main())
