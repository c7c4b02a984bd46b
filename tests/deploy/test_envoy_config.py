"""Every Envoy configuration in the repository passes `envoy --mode validate`,
is current with its generator, and holds the edge's rules."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from infermesh.supervisor import envoy_config

from tests.deploy.envoy_proc import validate

ROOT = Path(__file__).resolve().parents[2]


def envoy_configs() -> list[Path]:
    """Every YAML file in the repository that is an Envoy bootstrap."""
    found = []
    skip = {".venv", ".git", "node_modules", "build", ".pytest_cache"}
    for path in sorted(p for p in ROOT.rglob("*.y*ml") if not skip & set(p.relative_to(ROOT).parts)):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
        if any("static_resources" in d for d in docs):
            found.append(path)
    return found


def test_every_deploy_variant_is_found() -> None:
    assert {str(p.relative_to(ROOT)) for p in envoy_configs()} == set(envoy_config.VARIANTS)


@pytest.mark.parametrize("path", envoy_configs(), ids=lambda p: str(p.relative_to(ROOT)))
def test_envoy_accepts_config(path: Path) -> None:
    result = validate(path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "OK" in output
    assert "deprecated" not in output.lower(), output


def test_rendered_for_up_with_several_frontends_is_valid(tmp_path: Path) -> None:
    """What `infermesh up --frontends 3` runs."""
    settings = envoy_config.EdgeSettings(
        frontends=tuple(envoy_config.Frontend("127.0.0.1", 8000 + i, 50050 + i) for i in range(3)),
        listen_host="127.0.0.1")
    path = tmp_path / "envoy.yaml"
    path.write_text(envoy_config.render(settings))
    result = validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    clusters = yaml.safe_load(path.read_text())["static_resources"]["clusters"]
    assert [len(c["load_assignment"]["endpoints"][0]["lb_endpoints"]) for c in clusters] == [3, 3]


def test_deploy_files_are_current() -> None:
    for path, text in envoy_config.rendered_variants().items():
        assert (ROOT / path).read_text() == text, \
            f"{path} is stale: python -m infermesh.supervisor.envoy_config --write"
    assert envoy_config.main(["--root", str(ROOT)]) == 0


def _manager(config: dict[str, Any]) -> dict[str, Any]:
    edge = config["static_resources"]["listeners"][0]
    assert edge["name"] == "edge"
    return edge["filter_chains"][0]["filters"][0]["typed_config"]


@pytest.mark.parametrize("variant", sorted(envoy_config.VARIANTS))
def test_edge_rules(variant: str) -> None:
    config = yaml.safe_load((ROOT / variant).read_text())
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    manager = _manager(config)
    assert manager["codec_type"] == "AUTO"
    assert "http2_protocol_options" in manager and "http_protocol_options" in manager
    assert manager["generate_request_id"] and manager["preserve_external_request_id"]
    assert manager["stream_idle_timeout"] == envoy_config.STREAM_IDLE_TIMEOUT
    assert manager["access_log"][0]["typed_config"]["log_format"]["json_format"]["request_id"]
    routes = manager["route_config"]["virtual_hosts"][0]["routes"]
    # gRPC first (by content-type), everything else after it.
    assert routes[0]["match"] == {"prefix": "/", "grpc": {}} and routes[0]["route"]["cluster"] == "frontend_grpc"
    assert routes[1]["match"] == {"prefix": "/"} and routes[1]["route"]["cluster"] == "frontend_http"
    for route in routes:
        assert route["route"]["timeout"] == "0s"
        safe = {"connect-failure", "reset-before-request", "refused-stream"}
        assert set(route["route"]["retry_policy"]["retry_on"].split(",")) <= safe
    filters = [f["name"] for f in manager["http_filters"]]
    assert filters == ["envoy.filters.http.buffer", "envoy.filters.http.router"]
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    assert "grpc_health_check" in clusters["frontend_grpc"]["health_checks"][0]
    assert clusters["frontend_http"]["health_checks"][0]["http_health_check"]["path"] == "/health"
    for name in ("frontend_grpc", "frontend_http"):
        assert clusters[name]["outlier_detection"]["consecutive_local_origin_failure"] > 0
    explicit = clusters["frontend_grpc"]["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"]
    assert "http2_protocol_options" in explicit
