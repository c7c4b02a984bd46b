"""The tokenizer service as a real process over gRPC: clear statuses, and it keeps serving."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from infermesh.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from tests.harness import ServiceProcess, free_port, health_status


@pytest.fixture(scope="module")
def channel(tokenizer_proc: ServiceProcess):
    with grpc.insecure_channel(tokenizer_proc.address) as ch:
        yield ch


@pytest.fixture(scope="module")
def stub(channel):
    return tokenizer_pb2_grpc.TokenizerStub(channel)


def _chat(model: str, *messages: tuple[str, str], **kwargs) -> tokenizer_pb2.RenderRequest:
    return tokenizer_pb2.RenderRequest(
        model=model, messages=[common_pb2.ChatMessage(role=r, content=c) for r, c in messages], **kwargs)


def _assert_still_serving(stub, model: str) -> None:
    reply = stub.Render(_chat(model, ("user", "still there?")), timeout=5)
    assert len(reply.token_ids) > 3


def test_health_serving(tokenizer_proc: ServiceProcess) -> None:
    assert health_status(tokenizer_proc.address) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(tokenizer_proc.address, "infermesh.v1.Tokenizer") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_service(channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"infermesh.v1.Tokenizer", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("case", ["unknown_model", "empty_model", "empty_messages",
                                  "invalid_role", "both_inputs", "empty_prompt", "decode_out_of_vocab"])
def test_bad_requests_get_clear_statuses(case: str, stub, model_name: str) -> None:
    calls = {
        "unknown_model": (lambda: stub.Render(_chat("no-such-model", ("user", "hi"))),
                          grpc.StatusCode.NOT_FOUND, "does not exist"),
        "empty_model": (lambda: stub.Render(_chat("", ("user", "hi"))), grpc.StatusCode.INVALID_ARGUMENT,
                        "model is required"),
        "empty_messages": (lambda: stub.Render(tokenizer_pb2.RenderRequest(model=model_name)),
                           grpc.StatusCode.INVALID_ARGUMENT, "messages must not be empty"),
        "invalid_role": (lambda: stub.Render(_chat(model_name, ("wizard", "hi"))),
                         grpc.StatusCode.INVALID_ARGUMENT, "role must be one of"),
        "both_inputs": (lambda: stub.Render(_chat(model_name, ("user", "hi"), prompt="x")),
                        grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        "empty_prompt": (lambda: stub.Render(tokenizer_pb2.RenderRequest(model=model_name, prompt="")),
                         grpc.StatusCode.INVALID_ARGUMENT, "prompt must not be empty"),
        "decode_out_of_vocab": (lambda: stub.Decode(tokenizer_pb2.DecodeRequest(
            model=model_name, items=[common_pb2.TokenIds(ids=[1, 10_000_000])])),
            grpc.StatusCode.INVALID_ARGUMENT, "outside the vocabulary"),
    }
    call, code, text = calls[case]
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code
    assert text in info.value.details()
    _assert_still_serving(stub, model_name)


def test_malformed_bytes_are_invalid_argument(channel, stub, model_name: str) -> None:
    raw = channel.unary_unary("/infermesh.v1.Tokenizer/Render", request_serializer=lambda b: b,
                              response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        raw(b"\x12\xff\xff\xff\xff\x0f")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request" in info.value.details()
    _assert_still_serving(stub, model_name)


def test_tokenizer_definition_detokenizes_locally(stub, model_name: str) -> None:
    from tokenizers import Tokenizer

    definition = stub.GetTokenizer(tokenizer_pb2.GetTokenizerRequest(model=model_name))
    assert 2 in definition.eos_token_ids  # <|im_end|>
    local = Tokenizer.from_str(definition.tokenizer_json.decode())
    ids = stub.Render(tokenizer_pb2.RenderRequest(model=model_name, prompt="Grüße 😀")).token_ids
    assert local.decode(list(ids)) == "Grüße 😀"


def test_list_models(stub, model_name: str) -> None:
    models = stub.ListModels(common_pb2.ListModelsRequest()).models
    # The tokenizer does not judge lengths: the context window is what the workers report.
    assert [(m.id, m.max_model_len, m.simulated) for m in models] == [(model_name, 0, False)]


def test_metrics_count_calls_by_method_and_code(stub, model_name: str, tokenizer_proc: ServiceProcess) -> None:
    import urllib.request

    port = int(tokenizer_proc.args[tokenizer_proc.args.index("--metrics-port") + 1])
    with pytest.raises(grpc.RpcError):
        stub.Render(_chat("no-such-model", ("user", "x")))
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'infermesh_tokenizer_requests_total{code="NOT_FOUND",method="Render"}' in body
    assert 'infermesh_tokenizer_request_seconds_count{method="Render"}' in body


def test_request_id_in_logs_and_prompts_absent(stub, model_name: str, tokenizer_proc: ServiceProcess) -> None:
    secret = "secret-prompt-text-91823"
    with pytest.raises(grpc.RpcError):
        stub.Render(_chat("no-such-model", ("user", secret)), metadata=(("x-request-id", "rid-test-4711"),))
    stub.Render(_chat(model_name, ("user", secret)), metadata=(("x-request-id", "rid-test-4712"),))
    log = tokenizer_proc.log()
    line = next(line for line in log.splitlines() if "rid-test-4711" in line)
    assert "NOT_FOUND" in line
    assert secret not in log


def test_sigterm_drains_and_exits_zero(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    proc = ServiceProcess("tokenizer-term", ["tokenizer", "--port", str(port), "--metrics-port", "0",
                                             "--model", str(model_dir), "--log-format", "json"],
                          port=port, log_dir=tmp_path).start().wait_healthy()
    proc.signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    assert '"msg": "tokenizer stopped"' in proc.log()


def test_invalid_configuration_exits_2_with_every_problem(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "infermesh.cli", "tokenizer", "--port", "99999",
                             "--model", str(tmp_path), "--threads", "0"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "port must be a port number" in result.stderr
    assert "has no tokenizer.json" in result.stderr
    assert "threads must be >= 1" in result.stderr


def test_port_in_use_exits_1_with_a_clear_message(tokenizer_proc: ServiceProcess, model_dir: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "infermesh.cli", "tokenizer", "--port", str(tokenizer_proc.port),
                             "--metrics-port", "0", "--model", str(model_dir)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot start: cannot bind 127.0.0.1:{tokenizer_proc.port} (port in use?)" in result.stderr
    assert "Traceback" not in result.stderr
