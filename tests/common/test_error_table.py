"""The error table, walked over both APIs: every class's gRPC code, HTTP status, OpenAI body and retry rule."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest
from infermesh.common import errors
from infermesh.common.errors import ERRORS, InfermeshError
from infermesh.common.server import ServiceInterceptor
from infermesh.frontend.app import create_app
from infermesh.frontend.auth import ApiKeys
from infermesh.frontend.grpc_api import InferenceService
from infermesh.frontend.request.generation import ServingOptions
from infermesh.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from tests.frontend.fakes import FakeBackends, rpc_error, tokens
from tests.harness import free_port

SECRET = "internal detail 10.1.2.3:50060"  # must never reach a client in a 5xx


def make(cls: type[InfermeshError]) -> InfermeshError:
    if issubclass(cls, errors.Overloaded):
        return cls(f"refused: {SECRET}", retry_after=2.5)
    return cls(f"failed: {SECRET}", param="model")


def test_every_class_is_in_the_table_with_a_complete_row() -> None:
    def subclasses(cls: type) -> set[type]:
        return {cls, *(s for sub in cls.__subclasses__() for s in subclasses(sub))}
    assert subclasses(InfermeshError) - {InfermeshError} <= set(ERRORS)
    for cls in ERRORS:
        assert isinstance(cls.grpc_code, grpc.StatusCode) and 400 <= cls.http_status <= 599
        assert cls.openai_type and cls.openai_code and cls.public_message
    # A client's mistake is never retried on another worker, nor is a request whose deadline passed;
    # a worker's refusal at capacity and its failures are.
    assert not any(cls.retry_elsewhere for cls in ERRORS if cls.http_status < 429)
    assert not errors.DeadlineExceeded.retry_elsewhere
    # A version rolled back is left for its model's stable version (the next of the chain), not its other workers.
    assert not errors.VersionRolledBack.retry_elsewhere and errors.VersionRolledBack.fall_back
    assert all(cls.retry_elsewhere for cls in ERRORS
               if cls.http_status == 429 or (cls.http_status >= 500 and cls not in (errors.DeadlineExceeded,
                                                                                       errors.VersionRolledBack)))


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
def test_grpc_status_round_trips_between_services(cls: type[InfermeshError]) -> None:
    exc = make(cls)
    code, details, trailers = errors.to_status(exc)
    assert code is cls.grpc_code and details == exc.message  # between services the message travels
    back = errors.from_rpc_error(grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers),
                                                      details))
    assert back.grpc_code is cls.grpc_code and back.retry_elsewhere == cls.retry_elsewhere
    assert back.message == exc.message
    if isinstance(exc, errors.Overloaded):
        assert isinstance(back, errors.Overloaded) and back.retry_after == 2.5
    public_code, public_details, _ = errors.to_status(exc, public=True)
    assert public_code is cls.grpc_code
    assert (SECRET in public_details) == (cls.http_status < 500)


def test_unexpected_exceptions_are_internal_and_say_nothing() -> None:
    assert errors.to_status(KeyError(SECRET)) == (grpc.StatusCode.INTERNAL, errors.InternalError.public_message, ())
    body = errors.error_body(KeyError(SECRET), "rid-1")
    assert body["error"]["code"] == "internal_error" and SECRET not in body["error"]["message"]
    assert "rid-1" in body["error"]["message"]
    unknown = errors.from_rpc_error(grpc.aio.AioRpcError(grpc.StatusCode.DATA_LOSS, grpc.aio.Metadata(),
                                                         grpc.aio.Metadata(), "x"))
    assert type(unknown) is errors.InternalError and unknown.retry_elsewhere


@pytest.fixture
def fake(model_dir: Path) -> FakeBackends:
    return FakeBackends(model_dir)


CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
async def test_http_status_and_body_follow_the_table(cls: type[InfermeshError], stream: bool,
                                                     fake: FakeBackends) -> None:
    fake.render_error = make(cls)
    app = create_app(fake, ApiKeys(""), ServingOptions(), max_body_bytes=1 << 20)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        reply = await client.post("/v1/chat/completions", json={**CHAT, "stream": stream},
                                  headers={"x-request-id": "rid-table"})
    assert reply.status_code == cls.http_status
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == (cls.openai_type, cls.openai_code)
    if cls.http_status >= 500:
        assert SECRET not in error["message"] and "rid-table" in error["message"] and error["param"] is None
    else:
        assert SECRET in error["message"] and error["param"] == make(cls).param
    assert (reply.headers.get("retry-after") == "3") == issubclass(cls, errors.Overloaded)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
async def test_public_grpc_status_follows_the_table(cls: type[InfermeshError], fake: FakeBackends) -> None:
    fake.render_error = make(cls)
    server = grpc.aio.server(interceptors=[ServiceInterceptor(public=True)])
    inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(fake, ApiKeys(""), ServingOptions()),
                                                       server)  # type: ignore[arg-type]
    port = server.add_insecure_port(f"127.0.0.1:{free_port()}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = inference_pb2_grpc.InferenceStub(channel).Generate(inference_pb2.GenerateRequest(
                model="m", prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=4)))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in call:
                    pass
    finally:
        await server.stop(None)
    err = info.value
    assert err.code() is cls.grpc_code
    assert (SECRET in (err.details() or "")) == (cls.http_status < 500)
    trailers = dict(err.trailing_metadata() or ())
    assert (trailers.get(errors.RETRY_AFTER_KEY) == "2500") == issubclass(cls, errors.Overloaded)


@pytest.mark.parametrize("cls", ERRORS, ids=lambda c: c.__name__)
async def test_a_worker_answering_with_it_is_retried_elsewhere_as_the_table_says(cls: type[InfermeshError],
                                                                                 fake: FakeBackends) -> None:
    from infermesh.frontend.request.generation import start_generation

    fake.admissions.extend(["w1", "w2"])
    fake.script("w1", rpc_error(make(cls)))
    fake.script("w2", tokens(fake.encode(" fine"), finish="stop"))
    gen = await start_generation(fake, ServingOptions(), request_id="rid", model="m",
                                 sampling=common_pb2.SamplingParams(max_tokens=4), tenant="t", priority=0, prompt="x")
    while not gen.output.done:
        await gen.output.wait()
        gen.output.take()
    await gen.close()
    assert len(fake.calls) == (2 if cls.retry_elsewhere else 1)
    assert (gen.output.error is None) == cls.retry_elsewhere
