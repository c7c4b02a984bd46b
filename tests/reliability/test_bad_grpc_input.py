"""Scenario 7 (gRPC): hypothesis-generated requests, and bytes that are no message, for every
method of every service (tokenizer, scheduler, worker, frontend Inference).

No call may end INTERNAL or UNKNOWN, none may hang, and every process stays up and healthy.
(The HTTP side is tests/frontend/test_schemathesis.py, extended in test_bad_http_input.py.)
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from infermesh.v1 import common_pb2, inference_pb2, scheduler_pb2, tokenizer_pb2, worker_pb2

from tests.fixtures.mesh import Mesh
from tests.harness import health_status
from tests.reliability.proto_strategies import message

SERVICES = [("tokenizer", tokenizer_pb2, "Tokenizer"), ("scheduler", scheduler_pb2, "Scheduler"),
            ("worker", worker_pb2, "Worker"), ("frontend", inference_pb2, "Inference")]
METHODS = [(tier, module, name, method) for tier, module, name in SERVICES
           for method in module.DESCRIPTOR.services_by_name[name].methods]
BAD = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED}
CODES: Counter[str] = Counter()


def _bases(model: str) -> dict[str, bytes]:
    """A valid request per method: the generated fields are merged into it (protobuf messages
    concatenate), so that generated values reach the logic past the first checks."""
    sampling = common_pb2.SamplingParams(max_tokens=8)
    messages = [common_pb2.ChatMessage(role="user", content="Hello")]
    bases = {
        "Tokenizer.Render": tokenizer_pb2.RenderRequest(model=model, messages=messages),
        "Tokenizer.Encode": tokenizer_pb2.EncodeRequest(model=model, texts=["Hello"]),
        "Tokenizer.Decode": tokenizer_pb2.DecodeRequest(model=model, items=[common_pb2.TokenIds(ids=[1, 2])]),
        "Scheduler.Admit": scheduler_pb2.AdmitRequest(model=model, prompt_tokens=4, max_tokens=8),
        "Worker.Generate": worker_pb2.GenerateTokensRequest(model=model, prompt_ids=[1, 2, 3], sampling=sampling),
        "Inference.Generate": inference_pb2.GenerateRequest(model=model, prompt="Hello", sampling=sampling),
    }
    return {name: request.SerializeToString() for name, request in bases.items()}


def _address(mesh: Mesh, tier: str) -> str:
    return {"tokenizer": mesh.tokenizer.address, "scheduler": mesh.scheduler.address,
            "worker": mesh.workers[0].address, "frontend": mesh.frontend.address}[tier]


def _call(channel: grpc.Channel, path: str, streaming: bool, payload: bytes) -> grpc.StatusCode:
    try:
        if streaming:
            call = channel.unary_stream(path)(payload, timeout=10)
            for _ in call:
                # The first message is enough: a stream may be long (WatchLoad never ends, at
                # the interval the request chose), and a cancelled call must free its work.
                call.cancel()
                break
        else:
            channel.unary_unary(path)(payload, timeout=10)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.CANCELLED:
            return grpc.StatusCode.OK
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "deadline passed" in (err.details() or ""):
            return err.code()  # the service refused a request whose own (generated) deadline had passed
        assert err.code() not in BAD, f"{path}: {err.code().name}: {err.details()}"
        return err.code()
    return grpc.StatusCode.OK


@pytest.fixture(scope="module")
def channels(sim_mesh: Mesh) -> Iterator[dict[str, grpc.Channel]]:
    opened = {tier: grpc.insecure_channel(_address(sim_mesh, tier)) for tier, _, _ in SERVICES}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.mark.parametrize(("tier", "module", "service", "method"), METHODS,
                         ids=[f"{t}.{m.name}" for t, _, _, m in METHODS])
def test_generated_requests_never_fail_internally(sim_mesh: Mesh, channels: dict[str, grpc.Channel], report,
                                                  tier: str, module: object, service: str, method: object) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    words = [sim_mesh.model, "", "user", "assistant", "nonexistent-model", "a" * 300, "b " * 5000]
    generated = message(method.input_type, words).map(lambda m: m.SerializeToString())
    base = _bases(sim_mesh.model).get(f"{service}.{method.name}")
    payloads = st.one_of(generated, st.binary(max_size=200),
                         *([generated.map(lambda extra: base + extra)] if base else []))
    seen: Counter[str] = Counter()

    @settings(max_examples=80, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(payloads)
    def run(payload: bytes) -> None:
        seen[_call(channels[tier], path, method.server_streaming, payload).name] += 1

    run()
    procs = {"tokenizer": sim_mesh.tokenizer, "scheduler": sim_mesh.scheduler, "worker": sim_mesh.workers[0],
             "frontend": sim_mesh.frontend}
    down = [name for name, p in procs.items()
            if p.proc.poll() is not None or health_status(p.address) != health_pb2.HealthCheckResponse.SERVING]
    report("bad-grpc-input", method=path, calls=sum(seen.values()), codes=dict(seen), down=down)
    assert not down
