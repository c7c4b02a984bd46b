"""`infermesh frontend`: the OpenAI-compatible HTTP API and the public gRPC API, in one process."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from infermesh.common.config import ServiceConfig, option
from infermesh.common.limits import MAX_BODY_BYTES
from infermesh.common.runner import run_service
from infermesh.common.server import GrpcServer

if TYPE_CHECKING:
    from infermesh.common.catalog import CatalogHolder

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FrontendConfig(ServiceConfig):
    port: int = option(50050, "gRPC port (infermesh.v1.Inference).")
    metrics_port: int = option(0, "Extra Prometheus port (0: none; /metrics is on the HTTP port).")
    http_port: int = option(8000, "HTTP port (OpenAI API, /health, /metrics).")
    tokenizer: str = option("127.0.0.1:50051", "Tokenizer service address.")
    scheduler: str = option("127.0.0.1:50052", "Scheduler service address.")
    api_keys: str = option("", "API keys as name:key,name2:key2 (each name a tenant); empty: no auth.")
    max_body_bytes: int = option(MAX_BODY_BYTES, "Largest request body accepted (larger: HTTP 413).")
    keepalive: float = option(5.0, "Seconds between SSE keep-alive comments while a stream waits.")
    first_event_wait: float = option(1.0, "Seconds a stream waits for a quick error before committing to 200.")
    admit_timeout: float = option(0.0, "Upper bound on waiting for admission, seconds (0: the scheduler's).")
    preload_model: list[str] = option(factory=list, help="Models whose tokenizer to fetch at start-up.")
    drain_delay: float = option(5.0, "On SIGTERM, keep taking new requests until none came for 1 s, at most this "
                                     "long, while the edge routes around this frontend (0: stop at once).")

    def __repr__(self) -> str:  # never print the keys
        return f"FrontendConfig(http_port={self.http_port}, port={self.port})"

    def validate(self) -> list[str]:
        problems = super().validate()
        if not 0 <= self.http_port <= 65535:
            problems.append(f"http_port must be a port number, got {self.http_port}")
        if self.max_body_bytes < 1024:
            problems.append("max_body_bytes must be at least 1024")
        if self.drain_delay < 0:
            problems.append("drain_delay must be >= 0")
        if self.keepalive <= 0 or self.first_event_wait < 0 or self.admit_timeout < 0:
            problems.append("keepalive must be > 0; first_event_wait and admit_timeout >= 0")
        from infermesh.common.errors import InvalidRequest
        from infermesh.frontend.auth import ApiKeys
        try:
            ApiKeys(self.api_keys)
        except InvalidRequest as exc:
            problems.append(f"api_keys: {exc.message}")
        return problems


class _HttpServer:
    """uvicorn inside our event loop; the gRPC server owns the signals and the drain."""

    def __init__(self, app: object, config: FrontendConfig) -> None:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        self.server = Server(uvicorn.Config(app, host=config.host, port=config.http_port, log_config=None,
                                            access_log=False, lifespan="off", loop="none",
                                            timeout_graceful_shutdown=max(1, int(config.grace_period)),
                                            timeout_keep_alive=30))
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise OSError("the HTTP server stopped at start-up")
            await asyncio.sleep(0.01)

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task


def open_catalog(path: str) -> CatalogHolder | None:
    """The running catalog (None without one: names are taken as the workers serve them); its metrics at zero,
    again after each reload. An invalid file stops the start with its problems."""
    if not path:
        return None
    from infermesh.common.catalog import CatalogHolder
    from infermesh.frontend import metrics

    holder = CatalogHolder.open(path)
    metrics.precreate_catalog(holder.current)
    holder.add_listener(metrics.precreate_catalog)
    logger.info("catalog %s: %d models, %d routes, %d fallback chains", path, len(holder.current.models),
                len(holder.current.routes), len(holder.current.chains))
    return holder


async def serve(config: FrontendConfig) -> None:
    from infermesh.common.channels import configure_tls
    from infermesh.frontend.app import create_app
    from infermesh.frontend.auth import ApiKeys
    from infermesh.frontend.backends import Backends
    from infermesh.frontend.drain import Drain
    from infermesh.frontend.grpc_api import InferenceService
    from infermesh.frontend.request.generation import ServingOptions
    from infermesh.frontend.request.targets import ModelTargets
    from infermesh.v1 import inference_pb2, inference_pb2_grpc

    configure_tls(config)  # the channels to the tokenizer, scheduler and workers
    targets = ModelTargets(open_catalog(config.catalog))
    keys = ApiKeys(config.api_keys)
    backends = Backends(config.tokenizer, config.scheduler)
    options = ServingOptions(keepalive=config.keepalive, first_event_wait=config.first_event_wait,
                             admit_timeout=config.admit_timeout or None)
    drain = Drain()
    http = _HttpServer(create_app(backends, keys, options, config.max_body_bytes, drain, targets), config)

    async def on_drain() -> None:
        drain.start()
        if config.drain_delay > 0:
            waited = await drain.wait_quiet(quiet=min(1.0, config.drain_delay), limit=config.drain_delay)
            logger.info("no new requests for %.1fs; closing the HTTP listener", waited)
        await http.stop()

    name = inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
    service = InferenceService(backends, keys, options, targets)
    server = GrpcServer("frontend", config, [(inference_pb2_grpc.add_InferenceServicer_to_server, service, name)],
                        on_drain=on_drain, public=True)

    async def ready() -> None:
        if targets.holder is not None:
            following.append(targets.holder.follow())
            following.append(targets.versions.follow(backends.scheduler_channel))  # versioned models' split
        await http.start()
        for model in config.preload_model:
            await backends.tokenizer_model(model)
        logger.info("HTTP on %s:%d (api keys: %s)", config.host, http.port, "on" if keys.enabled else "off")

    following: list[Callable[[], None]] = []
    try:
        await server.serve(ready=ready)
    finally:
        for stop in following:
            stop()
        await http.stop()
        await backends.close()


def main(argv: Sequence[str] | None = None) -> int:
    return run_service("frontend", FrontendConfig, argv,
                       "The OpenAI-compatible HTTP API and the public gRPC API.", serve)
