"""Which port each process of a local mesh gets, and a check that all are free.

The standard layout is DESIGN.md's: Envoy 8080 (admin 9901), frontend HTTP
8000 and gRPC 50050, tokenizer 50051 (metrics 9101), scheduler 50052 (metrics
9102), workers gRPC 50060, 50061, ... (metrics 9110, 9111, ...). Extra
frontends take HTTP 8001, 8002, ... and gRPC 50053 ... 50059, so at most 8
frontends fit beside the workers.

`--ports-from BASE` puts every port in one block from BASE instead, in the
order of `PortPlan.labelled()`: a second mesh beside a running `make up`, or a
test on free ports.
"""

from __future__ import annotations

import dataclasses
import socket

MAX_STANDARD_FRONTENDS = 8
MAX_WORKERS = 40


@dataclasses.dataclass(frozen=True)
class FrontendPorts:
    http: int
    grpc: int


@dataclasses.dataclass(frozen=True)
class WorkerPorts:
    grpc: int
    metrics: int


@dataclasses.dataclass(frozen=True)
class PortPlan:
    edge: int
    admin: int
    tokenizer: int
    tokenizer_metrics: int
    scheduler: int
    scheduler_metrics: int
    frontends: tuple[FrontendPorts, ...]
    workers: tuple[WorkerPorts, ...]

    def labelled(self, envoy: bool = True) -> list[tuple[str, int]]:
        """Every port with what it is for."""
        ports = [("Envoy edge", self.edge), ("Envoy admin", self.admin)] if envoy else []
        ports += [("tokenizer gRPC", self.tokenizer), ("tokenizer metrics", self.tokenizer_metrics),
                  ("scheduler gRPC", self.scheduler), ("scheduler metrics", self.scheduler_metrics)]
        for i, f in enumerate(self.frontends):
            ports += [(f"frontend-{i} HTTP", f.http), (f"frontend-{i} gRPC", f.grpc)]
        for i, w in enumerate(self.workers):
            ports += [(f"worker-{i} gRPC", w.grpc), (f"worker-{i} metrics", w.metrics)]
        return ports


class PlanError(ValueError):
    """The requested layout does not fit."""


def standard_plan(workers: int, frontends: int) -> PortPlan:
    if frontends > MAX_STANDARD_FRONTENDS:
        raise PlanError(f"at most {MAX_STANDARD_FRONTENDS} frontends fit the standard ports "
                        "(gRPC 50050, 50053-50059); use --ports-from BASE for more")
    if workers > MAX_WORKERS:
        raise PlanError(f"at most {MAX_WORKERS} workers fit the standard ports (gRPC 50060-50099); "
                        "use --ports-from BASE for more")
    grpc_ports = [50050] + list(range(50053, 50053 + frontends - 1))
    return PortPlan(
        edge=8080, admin=9901, tokenizer=50051, tokenizer_metrics=9101, scheduler=50052,
        scheduler_metrics=9102,
        frontends=tuple(FrontendPorts(8000 + i, grpc_ports[i]) for i in range(frontends)),
        workers=tuple(WorkerPorts(50060 + i, 9110 + i) for i in range(workers)))


def block_plan(base: int, workers: int, frontends: int) -> PortPlan:
    """Every port in one block: edge, admin, tokenizer (+metrics), scheduler (+metrics),
    then each frontend (HTTP, gRPC), then each worker (gRPC, metrics)."""
    size = 6 + 2 * frontends + 2 * workers
    if not 1024 <= base <= 65535 - size:
        raise PlanError(f"--ports-from {base}: the block of {size} ports must lie within 1024-65535")
    p = iter(range(base, base + size))
    edge, admin, tok, tok_m, sch, sch_m = (next(p) for _ in range(6))
    fronts = tuple(FrontendPorts(next(p), next(p)) for _ in range(frontends))
    work = tuple(WorkerPorts(next(p), next(p)) for _ in range(workers))
    return PortPlan(edge, admin, tok, tok_m, sch, sch_m, fronts, work)


def plan(workers: int, frontends: int, ports_from: int = 0) -> PortPlan:
    if workers < 1 or frontends < 1:
        raise PlanError("--workers and --frontends must be at least 1")
    return block_plan(ports_from, workers, frontends) if ports_from else standard_plan(workers, frontends)


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port (a socket in TIME_WAIT does not count)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ports_in_use(host: str, labelled: list[tuple[str, int]]) -> list[tuple[str, int]]:
    hosts = {host, "127.0.0.1"}
    return [(label, port) for label, port in labelled if not all(port_free(h, port) for h in hosts)]
