"""The Kubernetes manifests render (kustomize, built into kubectl) and pass
`kubernetes-validate` (strict, offline schemas). KEDA's ScaledObject and Argo
Rollouts' AnalysisTemplate are CRDs without a schema there: they are checked
structurally instead, by kind."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
VERSION = "1.37.0"
CRD_KINDS = {"ScaledObject", "AnalysisTemplate"}
VARIANTS = ["base", "overlays/gpu"]


def render(variant: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) renders the manifests"
    out = subprocess.run([kubectl, "kustomize", str(K8S / variant)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=VARIANTS)
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def validate(docs: list[dict[str, Any]]) -> int:
    """Validates every resource (strict), and that the CRDs' kinds have no schema offline; how many were
    validated (the CRDs are checked structurally by their tests)."""
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                kubernetes_validate.validate(doc, VERSION, strict=True)
            continue
        kubernetes_validate.validate(doc, VERSION, strict=True)
        checked += 1
    return checked


def test_every_resource_passes_kubernetes_validate(manifests: list[dict[str, Any]]) -> None:
    assert validate(manifests) >= 15


def test_scaled_object_structure(manifests: list[dict[str, Any]]) -> None:
    scaled = by_kind(manifests, "ScaledObject")["worker"]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] in by_kind(manifests, "Deployment")
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert "infermesh_scheduler_queue_depth" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_a_deployment_per_tier_with_probes_pdb_and_prestop(manifests: list[dict[str, Any]]) -> None:
    deployments = by_kind(manifests, "Deployment")
    assert set(deployments) == {"tokenizer", "scheduler", "worker", "frontend", "envoy"}
    pdbs = by_kind(manifests, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        container = _container(deployment)
        pod = deployment["spec"]["template"]["spec"]
        assert "preStop" in container["lifecycle"], name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        labels = deployment["spec"]["selector"]["matchLabels"]
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == labels, name
        for probe in ("readinessProbe", "livenessProbe"):
            if name == "envoy":
                assert container[probe]["httpGet"]["path"] == "/ready"
            else:
                port = container[probe]["grpc"]["port"]
                assert port in {p["containerPort"] for p in container["ports"]}, name
        # The grace period covers preStop plus the service's own drain.
        pre_stop = container["lifecycle"]["preStop"].get("sleep", {}).get("seconds", 30)
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        drain = float(env.get("INFERMESH_GRACE_PERIOD") or 0)
        assert pod["terminationGracePeriodSeconds"] > pre_stop + drain, name


def test_workers_found_by_dns_through_a_headless_service(manifests: list[dict[str, Any]]) -> None:
    services = by_kind(manifests, "Service")
    scheduler = _container(by_kind(manifests, "Deployment")["scheduler"])
    dns = {e["name"]: e["value"] for e in scheduler["env"]}["INFERMESH_WORKERS_DNS"]
    name, port = dns.split(":")
    assert services[name]["spec"]["clusterIP"] == "None"
    assert services[name]["spec"]["selector"] == by_kind(manifests, "Deployment")["worker"]["spec"]["selector"][
        "matchLabels"]
    assert int(port) in {p["port"] for p in services[name]["spec"]["ports"]}
    # Envoy's frontends, by DNS too.
    assert services["frontend-pods"]["spec"]["clusterIP"] == "None"


def test_hpas_on_cpu_for_frontends_and_tokenizers(manifests: list[dict[str, Any]]) -> None:
    hpas = by_kind(manifests, "HorizontalPodAutoscaler")
    assert set(hpas) == {"frontend", "tokenizer"}
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"]["name"] == name
        assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
        requests = _container(by_kind(manifests, "Deployment")[name])["resources"]["requests"]
        assert "cpu" in requests  # utilization needs a request


def test_envoy_config_map_is_the_rendered_edge_config(manifests: list[dict[str, Any]]) -> None:
    (config_map,) = [d for d in manifests if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy")]
    assert config_map["data"]["envoy.yaml"] == (K8S / "base" / "envoy.yaml").read_text()
    envoy = by_kind(manifests, "Deployment")["envoy"]["spec"]["template"]["spec"]
    assert envoy["volumes"][0]["configMap"]["name"] == config_map["metadata"]["name"]


def test_gpu_overlay_requests_gpus_for_workers_only() -> None:
    base = by_kind(render("base"), "Deployment")
    gpu = by_kind(render("overlays/gpu"), "Deployment")
    worker = _container(gpu["worker"])
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].startswith("infermesh-cuda")
    assert "VLLM_CPU_KVCACHE_SPACE" not in {e["name"] for e in worker["env"]}
    assert "nvidia.com/gpu" not in str(_container(base["worker"])["resources"])
    for name in ("tokenizer", "scheduler", "frontend", "envoy"):
        assert gpu[name] == base[name]


def test_envoy_prestop_drains_a_real_envoy(tmp_path: Path) -> None:
    """The preStop command, run against Envoy: /ready turns 503 DRAINING."""
    from infermesh.supervisor.readiness import http_status

    from tests.deploy.envoy_proc import EnvoyProcess
    from tests.harness import free_port

    container = _container(by_kind(render("base"), "Deployment")["envoy"])
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["bash", "-c"] and "/dev/tcp/127.0.0.1/9901" in command[2]
    envoy = EnvoyProcess([(free_port(), free_port())], tmp_path).start()
    try:
        envoy.wait_ready(path=None)
        script = command[2].replace("/9901", f"/{envoy.admin_port}").replace("sleep 30", "sleep 0")
        subprocess.run(["bash", "-c", script], check=True, timeout=30)
        assert http_status(envoy.admin + "/ready", 2) == 503
        with __import__("urllib.request").request.urlopen(envoy.admin + "/server_info", timeout=5) as reply:
            assert yaml.safe_load(reply.read())["state"] == "DRAINING"
    finally:
        envoy.stop()


def test_read_only_root_filesystems_have_a_writable_tmp(manifests: list[dict[str, Any]]) -> None:
    for name, deployment in by_kind(manifests, "Deployment").items():
        container = _container(deployment)
        if container["securityContext"].get("readOnlyRootFilesystem") and name != "envoy":
            assert "/tmp" in {m["mountPath"] for m in container.get("volumeMounts", [])}, name
