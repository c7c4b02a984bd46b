"""`infermesh scheduler`: the scheduler service process."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Sequence

from infermesh.common.config import ServiceConfig, option
from infermesh.common.runner import run_service
from infermesh.common.server import GrpcServer
from infermesh.scheduler.policies import POLICIES

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class SchedulerConfig(ServiceConfig):
    port: int = option(50052, "gRPC port.")
    metrics_port: int = option(9102, "Port of the Prometheus /metrics endpoint (0: none).")
    workers: list[str] = option(factory=list, help="Worker addresses host:port (comma-separated or repeated).")
    workers_dns: list[str] = option(factory=list, help="DNS names name:port re-resolved periodically "
                                    "(a Kubernetes headless service); every address found is a worker.")
    dns_interval: float = option(5.0, "Seconds between DNS re-resolutions.")
    policy: str = option("prefix_affinity", "Routing policy.", choices=POLICIES)
    max_queue: int = option(128, "Requests that may wait per model; more are refused (RESOURCE_EXHAUSTED).")
    queue_timeout: float = option(30.0, "Seconds a request may wait for a worker (then RESOURCE_EXHAUSTED, "
                                  "retry-after).")
    lease_ttl: float = option(10.0, "Seconds a lease lives if its worker never reports it started.")
    ttft_slo: float = option(0.0, "Time-to-first-token SLO in seconds (0: none). A request waits for a worker at most "
                             "--ttft-slo-queue-share of it (and never past --queue-timeout), then is refused "
                             "(RESOURCE_EXHAUSTED, retry-after); one whose expected wait is longer is refused at once.")
    ttft_slo_queue_share: float = option(0.5, "Share of --ttft-slo a request may spend in the admission queue; "
                                         "the rest is left for the path, prefill and the first token.")
    balance_abs_threshold: int = option(8, "prefix_affinity: balance instead when the cached worker holds more "
                                        "than this many sequences beyond the least-loaded one ...")
    balance_rel_threshold: float = option(1.5, "... and more than this many times its load.")
    prefix_index_blocks: int = option(0, "prefix_affinity: blocks remembered per worker "
                                      "(0: the worker's KV capacity in blocks).")
    tenant_weights: list[str] = option(factory=list, help="Fair-queuing weights TENANT=N (default 1 each).")
    report_interval_ms: int = option(1000, "Load-report period asked of the workers (they also report at once on "
                                     "every lease started or finished and on draining).")
    stale_after: float = option(3.0, "Seconds without a load report before a worker counts as unreachable.")
    state_file: str = option("", "Where rollbacks and rollout starts of the catalog's versions are kept across "
                             "restarts (default: $INFERMESH_HOME/scheduler/versions.json; 'none': nowhere).")

    def __post_init__(self) -> None:
        # "a:1,b:2" as one flag value, or repeated flags: one flat list either way.
        for name in ("workers", "workers_dns", "tenant_weights"):
            setattr(self, name, [x for item in getattr(self, name) for x in item.replace(",", " ").split()])

    def validate(self) -> list[str]:
        from infermesh.scheduler.workers import split_host_port

        problems = super().validate()
        for spec in [*self.workers, *self.workers_dns]:
            try:
                split_host_port(spec)
            except ValueError as exc:
                problems.append(f"workers: {exc}")
        try:
            self.weights()
        except ValueError as exc:
            problems.append(str(exc))
        for name in ("dns_interval", "queue_timeout", "lease_ttl", "stale_after", "balance_rel_threshold"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)}")
        if self.ttft_slo < 0:
            problems.append(f"ttft_slo must be >= 0 (0: none), got {self.ttft_slo}")
        if not 0 < self.ttft_slo_queue_share <= 1:
            problems.append(f"ttft_slo_queue_share must be in (0, 1], got {self.ttft_slo_queue_share}")
        for name in ("max_queue", "balance_abs_threshold", "prefix_index_blocks"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.report_interval_ms < 10:
            problems.append(f"report_interval_ms must be >= 10, got {self.report_interval_ms}")
        return problems

    def weights(self) -> dict[str, int]:
        out = {}
        for spec in self.tenant_weights:
            tenant, sep, weight = spec.rpartition("=")
            if not sep or not weight.isdigit() or int(weight) < 1:
                raise ValueError(f"tenant_weights: expected TENANT=N with N >= 1, got {spec!r}")
            out[tenant] = int(weight)
        return out


async def serve(config: SchedulerConfig) -> None:
    if not config.workers and not config.workers_dns:
        logger.warning("no workers configured (--workers or --workers-dns): every Admit will fail")
    from infermesh.common.channels import configure_tls
    from infermesh.scheduler.dispatcher import Dispatcher, Limits
    from infermesh.scheduler.policies import make_policy
    from infermesh.scheduler.service import SchedulerService
    from infermesh.scheduler.workers import WorkerPool
    from infermesh.v1 import scheduler_pb2, scheduler_pb2_grpc

    configure_tls(config)  # the channels to the workers
    policy = make_policy(config.policy, balance_abs_threshold=config.balance_abs_threshold,
                         balance_rel_threshold=config.balance_rel_threshold,
                         index_blocks=config.prefix_index_blocks)
    limits = Limits(config.max_queue, config.queue_timeout, config.lease_ttl, config.ttft_slo,
                    config.ttft_slo_queue_share)
    dispatcher = Dispatcher(policy, limits, tenant_weights=config.weights())
    holder = None
    if config.catalog:
        from infermesh.common.catalog import Catalog, CatalogHolder

        holder = CatalogHolder.open(config.catalog)

        from infermesh.common.model_prep import infermesh_home
        from infermesh.scheduler.version_state import StateFile

        if config.state_file != "none":
            dispatcher.versions.state = StateFile(config.state_file or infermesh_home() / "scheduler" / "versions.json")

        def expect(catalog: Catalog) -> None:
            for entry in catalog.served_models():
                dispatcher.expect_model(entry.name)
            dispatcher.versions.apply(catalog)
        expect(holder.current)
        holder.add_listener(expect)  # a model added to the catalog: its queue and metrics at once
    pool = WorkerPool(dispatcher, static=config.workers, dns=config.workers_dns, dns_interval=config.dns_interval,
                      watcher=f"scheduler@{socket.gethostname()}:{os.getpid()}",
                      interval_ms=config.report_interval_ms, stale_after=config.stale_after)
    name = scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name
    async def on_drain() -> None:
        dispatcher.versions.close()  # the frontends' WatchVersions streams end, as the workers' load streams do

    server = GrpcServer("scheduler", config, [(scheduler_pb2_grpc.add_SchedulerServicer_to_server,
                                               SchedulerService(dispatcher), name)], on_drain=on_drain)

    following = []

    async def ready() -> None:
        if holder is not None:
            following.append(holder.follow())
            analysis = asyncio.get_running_loop().create_task(dispatcher.versions.run())
            following.append(lambda: _cancel(analysis))
        await pool.start()
        await pool.wait_first_attempts(timeout=5.0)
        logger.info("scheduler policy %s over %d workers", policy.name, len(pool.watches))
        if limits.budget() is not None:
            logger.info("TTFT SLO %gs: a request waits at most %.3gs for admission", limits.ttft_slo, limits.budget())

    try:
        await server.serve(ready=ready)
    finally:
        for stop in following:
            stop()
        await pool.stop()


def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("scheduler", SchedulerConfig, argv,
                       "Admission control and routing of requests to workers.", serve)
