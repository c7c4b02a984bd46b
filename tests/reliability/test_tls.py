"""Scenario 8 (TLS): every service-to-service call over TLS, and mutual TLS as an option, with
certificates the test generates. The HTTP API stays plain (TLS to clients is the edge's)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from infermesh.common.channels import client_credentials
from infermesh.common.server import server_credentials
from infermesh.tokenizer.main import TokenizerConfig

from tests.harness import ServiceProcess, free_port
from tests.reliability.certs import Pki, make_pki


def _health(address: str, credentials: grpc.ChannelCredentials | None) -> int | None:
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        try:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)
        except grpc.RpcError:
            return None


def _start(name: str, args: list[str], log_dir: Path, credentials: grpc.ChannelCredentials) -> ServiceProcess:
    port = free_port()
    proc = ServiceProcess(name, [*args, "--port", str(port), "--metrics-port", "0"], port=port,
                          log_dir=log_dir).start()
    deadline = time.monotonic() + 60
    while _health(proc.address, credentials) != health_pb2.HealthCheckResponse.SERVING:
        assert proc.proc is not None and proc.proc.poll() is None, proc.log()[-3000:]
        assert time.monotonic() < deadline, proc.log()[-3000:]
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mtls"])
def test_services_talk_over_tls(model_dir: Path, tmp_path: Path, report, mutual: bool) -> None:
    pki = make_pki(tmp_path, "mesh")
    rogue = make_pki(tmp_path, "rogue")
    ca, key, cert = pki.read()
    client = grpc.ssl_channel_credentials(ca, key, cert) if mutual else grpc.ssl_channel_credentials(ca)
    tls = ["--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--tls-ca", str(pki.ca)]
    if mutual:
        tls.append("--tls-client-auth")
    procs: list[ServiceProcess] = []
    try:
        procs.append(_start("tls-tokenizer", ["tokenizer", "--model", str(model_dir), *tls], tmp_path, client))
        procs.append(_start("tls-worker", ["worker", "--engine", "sim", "--model", str(model_dir), "--sim-itl-ms", "0",
                                           *tls], tmp_path, client))
        procs.append(_start("tls-scheduler", ["scheduler", "--workers", procs[1].address, *tls], tmp_path, client))
        http_port = free_port()
        procs.append(_start("tls-frontend", ["frontend", "--http-port", str(http_port), "--tokenizer",
                                             procs[0].address, "--scheduler", procs[2].address, *tls],
                            tmp_path, client))
        # A whole request crosses every hop (frontend -> tokenizer, scheduler, worker; scheduler -> worker).
        deadline = time.monotonic() + 30
        while httpx.get(f"http://127.0.0.1:{http_port}/health", timeout=5).status_code != 200:
            assert time.monotonic() < deadline, procs[3].log()[-3000:]
            time.sleep(0.1)
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/chat/completions", timeout=30, json={
            "model": model_dir.name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        plaintext = {p.name: _health(p.address, None) for p in procs}
        no_client_cert = _health(procs[0].address, grpc.ssl_channel_credentials(ca))
        rogue_ca, rogue_key, rogue_cert = rogue.read()
        rogue_client = _health(procs[0].address, grpc.ssl_channel_credentials(ca, rogue_key, rogue_cert))
        rogue_server = _health(procs[0].address, grpc.ssl_channel_credentials(rogue_ca))
    finally:
        for proc in reversed(procs):
            proc.stop()
    report("tls", mutual=mutual, request=reply.status_code,
           plaintext_refused=all(v is None for v in plaintext.values()),
           without_client_cert=no_client_cert, rogue_client_cert=rogue_client, untrusted_server=rogue_server)
    assert reply.status_code == 200, reply.text
    assert all(v is None for v in plaintext.values()), plaintext
    assert rogue_server is None  # a client that does not trust the mesh's CA does not connect
    if mutual:
        assert no_client_cert is None and rogue_client is None
    else:
        assert no_client_cert == health_pb2.HealthCheckResponse.SERVING


def test_tls_options_are_checked_and_off_by_default(tmp_path: Path) -> None:
    assert server_credentials(TokenizerConfig()) is None
    assert client_credentials(TokenizerConfig()) is None
    pki: Pki = make_pki(tmp_path, "unit")
    cert, key, ca = str(pki.cert), str(pki.key), str(pki.ca)
    assert "tls_cert and tls_key go together" in TokenizerConfig(tls_cert=cert).validate()
    assert any("tls_client_auth needs tls_ca" in p
               for p in TokenizerConfig(tls_cert=cert, tls_key=key, tls_client_auth=True).validate())
    assert any("no such file" in p for p in TokenizerConfig(tls_ca=str(tmp_path / "missing.pem")).validate())
    mutual = TokenizerConfig(tls_cert=cert, tls_key=key, tls_ca=ca, tls_client_auth=True)
    assert mutual.validate() == []
    assert server_credentials(mutual) is not None and client_credentials(mutual) is not None
