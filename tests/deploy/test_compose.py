"""docker-compose, checked without a Docker engine: the files parse, lint clean,
every dependency exists and is health-gated, ports agree across the services,
Envoy and Prometheus, and the GPU override reserves GPUs for the workers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.debian import ensure_prometheus

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((COMPOSE / name).read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load("docker-compose.yaml")


def test_yamllint_is_clean_on_all_of_deploy() -> None:
    result = subprocess.run([str(Path(shutil.which("yamllint") or ROOT / ".venv/bin/yamllint")), "--strict",
                             "-c", str(ROOT / "deploy" / ".yamllint.yaml"), str(ROOT / "deploy")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_service_runs_something(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"tokenizer", "scheduler", "worker", "frontend", "envoy", "prometheus"} <= set(services)
    for name, service in services.items():
        assert service.get("image"), name
        if "build" in service:
            assert (ROOT / "deploy" / "compose" / service["build"]["context"] /
                    service["build"]["dockerfile"]).is_file(), name
    assert services["worker"]["image"].startswith("infermesh-cpu")
    assert services["worker"]["build"]["target"] == "cpu"
    assert services["frontend"]["build"]["target"] == "base"


def test_depends_on_targets_exist_are_health_gated_and_acyclic(compose: dict[str, Any]) -> None:
    services = compose["services"]
    graph: dict[str, set[str]] = {}
    for name, service in services.items():
        deps = service.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: depends_on with conditions"
        graph[name] = set(deps)
        for target, rule in deps.items():
            assert target in services, f"{name} depends on unknown {target}"
            assert rule["condition"] in CONDITIONS
            if rule["condition"] == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{target} has no health check"
            if rule["condition"] == "service_completed_successfully":
                assert services[target].get("restart") == "no", target
    # The mesh's tiers wait for the ones they call.
    assert services["frontend"]["depends_on"]["worker"]["condition"] == "service_healthy"
    assert services["envoy"]["depends_on"]["frontend"]["condition"] == "service_healthy"
    seen: set[str] = set()
    stack: list[str] = []

    def visit(node: str) -> None:
        assert node not in stack, f"dependency cycle: {stack + [node]}"
        if node in seen:
            return
        stack.append(node)
        for dep in graph[node]:
            visit(dep)
        stack.pop()
        seen.add(node)

    for node in graph:
        visit(node)


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in service.get("environment", {}).items()}


def test_ports_agree_across_services_envoy_and_prometheus(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = {name: _env(s) for name, s in services.items()}
    assert env["frontend"]["INFERMESH_TOKENIZER"] == f"tokenizer:{env['tokenizer']['INFERMESH_PORT']}"
    assert env["frontend"]["INFERMESH_SCHEDULER"] == f"scheduler:{env['scheduler']['INFERMESH_PORT']}"
    assert env["scheduler"]["INFERMESH_WORKERS_DNS"] == f"worker:{env['worker']['INFERMESH_PORT']}"
    envoy = yaml.safe_load((COMPOSE / "envoy.yaml").read_text())
    endpoints = {c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"][
        "socket_address"] for c in envoy["static_resources"]["clusters"]}
    assert endpoints["frontend_grpc"] == {"address": "frontend", "port_value": int(env["frontend"]["INFERMESH_PORT"])}
    assert endpoints["frontend_http"] == {"address": "frontend",
                                          "port_value": int(env["frontend"]["INFERMESH_HTTP_PORT"])}
    mount = next(v for v in services["envoy"]["volumes"] if v.startswith("./envoy.yaml:"))
    assert mount.split(":")[1] == services["envoy"]["command"][services["envoy"]["command"].index("-c") + 1]
    # Prometheus scrapes every service's metrics port.
    jobs = {job["job_name"]: job for job in load("prometheus.yml")["scrape_configs"]}
    expected = {"tokenizer": env["tokenizer"]["INFERMESH_METRICS_PORT"],
                "scheduler": env["scheduler"]["INFERMESH_METRICS_PORT"],
                "worker": env["worker"]["INFERMESH_METRICS_PORT"],
                "frontend": env["frontend"]["INFERMESH_HTTP_PORT"], "envoy": "9902"}
    for job, port in expected.items():
        (sd,) = jobs[job]["dns_sd_configs"]
        assert sd["names"] == [job] and sd["port"] == int(port), job
    assert jobs["envoy"]["metrics_path"] == "/stats/prometheus"


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source}"


def test_prometheus_config_passes_promtool() -> None:
    _, promtool = ensure_prometheus()
    result = subprocess.run([promtool, "check", "config", "--syntax-only", str(COMPOSE / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_gpu_override_reserves_a_gpu_per_worker(compose: dict[str, Any]) -> None:
    gpu = load("docker-compose.gpu.yaml")
    assert set(gpu["services"]) <= set(compose["services"])
    worker = gpu["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
    assert worker["build"]["target"] == "cuda" and worker["image"].startswith("infermesh-cuda")
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    for service in (compose["services"]["worker"], worker):
        assert re.search(rf"^FROM \S+ AS {service['build']['target']}$", dockerfile, re.MULTILINE)
