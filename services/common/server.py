"""One gRPC server bootstrap for every service.

`GrpcServer` wires up what every service needs: `grpc.health.v1` (NOT_SERVING
until the service says it is ready), server reflection, a Prometheus
`/metrics` endpoint, the request id from `x-request-id` metadata bound for
every log line, the project's errors mapped to gRPC status codes (in one
interceptor), and a graceful SIGTERM: NOT_SERVING first, then the service's
own drain, then `stop(grace)`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from infermesh.common.config import ServiceConfig
from infermesh.common.context import REQUEST_ID_HEADER, set_request_id
from infermesh.common.errors import InfermeshError, to_status

logger = logging.getLogger(__name__)

# Big enough for tokenizer definitions and long prompts; keepalives find dead
# peers (a killed worker) in seconds, not minutes.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
)
SERVER_OPTIONS: tuple[tuple[str, Any], ...] = CHANNEL_OPTIONS + (
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
)

_PASSTHROUGH = ("/grpc.health.v1.", "/grpc.reflection.")


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str, public: bool) -> None:
    code, details, trailers = to_status(exc, public=public)
    if not isinstance(exc, InfermeshError):
        logger.exception("unhandled error in %s", method, exc_info=exc)
    elif exc.http_status >= 500 and public:
        logger.warning("%s -> %s: %s", method, code.name, exc.message)  # the caller sees the public message only
    elif code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        logger.error("%s failed: %s", method, details)
    else:
        # Messages name parameters and sizes, never prompt text.
        logger.info("%s -> %s: %s", method, code.name, details)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(code, details)


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:
            return _Malformed(type(exc).__name__)
    return parse


async def _reject_malformed(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, _Malformed):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"malformed request: the message does not parse ({request.reason})")


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_HEADER:
            return str(value)
    return None


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Binds the request id and maps the project's errors to gRPC statuses (`public`: for callers outside the
    mesh, whose server-side failures carry only their public message)."""

    def __init__(self, public: bool = False) -> None:
        self.public = public
        # The wrapped handler of each method, built on its first call (not on every call).
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(_PASSTHROUGH):
            return handler
        if handler.unary_unary:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method, self.public),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        elif handler.unary_stream:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method, self.public),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        else:
            return handler
        self._handlers[method] = wrapped
        return wrapped


def _wrap_unary(behavior: Callable[..., Any], method: str, public: bool) -> Callable[..., Any]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
        set_request_id(_request_id(context))
        await _reject_malformed(request, context)
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc, method, public)
    return wrapper


def _wrap_stream(behavior: Callable[..., Any], method: str, public: bool) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(behavior):
        async def gen_wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            set_request_id(_request_id(context))
            await _reject_malformed(request, context)
            try:
                async for item in behavior(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:
                await _abort(context, exc, method, public)
        return gen_wrapper
    return _wrap_unary(behavior, method, public)


def server_credentials(config: ServiceConfig) -> grpc.ServerCredentials | None:
    """TLS (mutual with --tls-client-auth) when --tls-cert is set, else None (plaintext)."""
    if not config.tls_cert:
        return None
    with open(config.tls_cert, "rb") as cert, open(config.tls_key, "rb") as key:
        pair = (key.read(), cert.read())
    ca = None
    if config.tls_ca:
        with open(config.tls_ca, "rb") as f:
            ca = f.read()
    return grpc.ssl_server_credentials([pair], root_certificates=ca if config.tls_client_auth else None,
                                       require_client_auth=config.tls_client_auth)


Registration = tuple[Callable[[Any, grpc.aio.Server], None], Any, str]


class GrpcServer:
    """A service's gRPC server with health, reflection, metrics and drain.

    `services` lists (add_XServicer_to_server, servicer, full service name).
    `on_drain` runs after health turns NOT_SERVING and before the server stops
    accepting calls; it may wait for in-flight work (bounded by the grace period). `public`: the
    service faces callers outside the mesh (see `ServiceInterceptor`).
    """

    def __init__(self, name: str, config: ServiceConfig, services: Sequence[Registration],
                 *, on_drain: Callable[[], Awaitable[None]] | None = None, public: bool = False) -> None:
        self.name = name
        self.config = config
        self.services = list(services)
        self.on_drain = on_drain
        self.health = HealthServicer()
        self.server = grpc.aio.server(interceptors=[ServiceInterceptor(public)], options=SERVER_OPTIONS)
        self.port = 0
        self.metrics_port = 0
        self._stopping: asyncio.Event | None = None
        self._metrics_server: Any = None

    @property
    def service_names(self) -> list[str]:
        return [full_name for _, _, full_name in self.services]

    async def start(self) -> None:
        for add, servicer, _ in self.services:
            add(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            [*self.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME], self.server)
        await self.set_serving(False)
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(address)
            else:
                self.port = self.server.add_secure_port(address, credentials)
        except RuntimeError:  # grpc's way of saying the bind failed
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind {address} (port in use?)")
        await self.server.start()
        if self.config.metrics_port:
            self._start_metrics()
        logger.info("%s listening on %s:%d", self.name, self.config.host, self.port,
                    extra={"metrics_port": self.metrics_port or None})

    def _start_metrics(self) -> None:
        from prometheus_client import start_http_server

        try:
            server, _thread = start_http_server(self.config.metrics_port, addr=self.config.host)
        except OSError as exc:
            raise OSError(f"cannot bind metrics port {self.config.metrics_port}: {exc}") from exc
        self._metrics_server = server
        self.metrics_port = server.server_address[1]

    async def set_serving(self, serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for service in ("", *self.service_names):
            await self.health.set(service, status)

    def request_stop(self) -> None:
        """Begins a graceful stop (what SIGTERM does)."""
        if self._stopping is not None:
            self._stopping.set()

    async def serve(self, ready: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
        """Starts, marks SERVING (after `ready`), and runs until SIGTERM/SIGINT, then drains."""
        self._stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self.start()
        if ready is not None:
            ready_task = asyncio.create_task(ready())
            stop_task = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait({ready_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
            if ready_task in done:
                stop_task.cancel()
                ready_task.result()
            else:
                ready_task.cancel()
        if not self._stopping.is_set():
            await self.set_serving(True)
            logger.info("%s serving", self.name)
            await self._stopping.wait()
        await self.shutdown()

    async def shutdown(self) -> None:
        grace = self.config.grace_period
        logger.info("%s draining (grace %.0fs)", self.name, grace)
        await self.health.enter_graceful_shutdown()
        if self.on_drain is not None:
            try:
                await asyncio.wait_for(self.on_drain(), timeout=grace)
            except TimeoutError:
                logger.warning("%s: drain did not finish within %.0fs", self.name, grace)
        await self.server.stop(grace)
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
        logger.info("%s stopped", self.name)
