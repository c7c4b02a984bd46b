"""The catalog on Kubernetes: `infermesh k8s-manifests` renders a catalog into a kustomize overlay on
base, and `deploy/k8s/overlays/catalog-demo/` is what it renders for the demo catalog now.

Checked on the committed overlay, rendered by kustomize (`kubectl kustomize`) in its three variants (KEDA,
HPA, no autoscaling) and validated as base is: one worker Deployment per model with the model's arguments
and replicas, the schedulers finding every model's workers, each autoscaler on its own model's queue, the
catalog ConfigMap equal to the source file and mounted into every service. Then the renderer alone, on a
catalog with awkward names, directory weights and a model whose workers run elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from infermesh.cli import COMMANDS
from infermesh.common.catalog import Catalog, ModelEntry, load_catalog, parse_catalog
from infermesh.scheduler.metrics import QUEUE_DEPTH
from infermesh.supervisor import k8s_documents, kubernetes

from tests.deploy.test_k8s import K8S, by_kind, render, validate

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "deploy" / "catalog" / "demo.yaml"
OVERLAY = K8S / "overlays" / "catalog-demo"
KEDA, HPA, MESH = "overlays/catalog-demo", "overlays/catalog-demo/hpa", "overlays/catalog-demo/mesh"
TIERS = {"tokenizer", "scheduler", "frontend", "envoy"}  # base's Deployments besides its single worker
MODEL_LABEL = "infermesh.io/model"


@pytest.fixture(scope="module")
def demo() -> Catalog:
    return load_catalog(DEMO)


@pytest.fixture(scope="module", params=[KEDA, HPA, MESH])
def variant(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(request.param)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


def _workers(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The worker Deployments by the model their pods serve (from the worker's own --model NAME=DIR)."""
    found: dict[str, dict[str, Any]] = {}
    for deployment in by_kind(docs, "Deployment").values():
        args = _container(deployment)["args"]
        if args[0] == "worker":
            model = args[args.index("--model") + 1].partition("=")[0]
            assert model not in found, f"{model} has two worker Deployments"
            found[model] = deployment
    return found


def expected_args(entry: ModelEntry) -> list[str]:
    args = ["worker", "--model", f"{entry.name}=/models/{entry.name}", *entry.engine.worker_args()]
    return args + ["--task", "embed"] if entry.task == "embed" else args


# --- the committed overlay --------------------------------------------------------------------------------------

def test_the_committed_overlay_is_what_the_demo_catalog_renders(tmp_path: Path) -> None:
    data = DEMO.read_bytes()
    files = kubernetes.render(parse_catalog(data, str(DEMO)), data)
    committed = {str(p.relative_to(OVERLAY)): p.read_bytes() for p in sorted(OVERLAY.rglob("*")) if p.is_file()}
    assert sorted(committed) == sorted(files), "render again: infermesh k8s-manifests --catalog " \
        "deploy/catalog/demo.yaml --out deploy/k8s/overlays/catalog-demo"
    for path, content in files.items():
        assert committed[path] == content, f"{path} is not what the catalog renders now"
    # The command says the same, and writes the same files.
    assert kubernetes.main(["--catalog", str(DEMO), "--out", str(OVERLAY), "--check"]) == 0
    assert kubernetes.main(["--catalog", str(DEMO), "--out", str(tmp_path)]) == 0
    assert {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == committed


def test_the_command_is_registered_and_check_sees_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) \
        -> None:
    assert COMMANDS["k8s-manifests"][0] == kubernetes.__name__
    assert kubernetes.main(["--catalog", str(DEMO), "--out", str(tmp_path)]) == 0
    (tmp_path / "mesh" / "workers.yaml").write_text("# edited by hand\n")
    assert kubernetes.main(["--catalog", str(DEMO), "--out", str(tmp_path), "--check"]) == 1
    assert "mesh/workers.yaml" in capsys.readouterr().err


def test_every_resource_passes_kubernetes_validate(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    assert validate(docs) >= 15


def test_each_model_has_one_worker_deployment_with_its_args_and_replicas(
        variant: tuple[str, list[dict[str, Any]]], demo: Catalog) -> None:
    _, docs = variant
    deployments = by_kind(docs, "Deployment")
    workers = _workers(docs)
    assert set(workers) == set(demo.model_names())
    assert set(deployments) == TIERS | {d["metadata"]["name"] for d in workers.values()}  # base's `worker` is gone
    for entry in demo.models:
        deployment = workers[entry.name]
        label = k8s_documents.dns_label(entry.name)
        assert deployment["metadata"]["name"] == f"worker-{label}"
        assert deployment["spec"]["replicas"] == entry.workers
        assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/component": "worker",
                                                                 MODEL_LABEL: label}
        assert _container(deployment)["args"] == expected_args(entry)
        # The weights: converted by an init container into the volume the worker reads /models/NAME from.
        pod = deployment["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        assert init["args"] == ["prepare-model", entry.weights.prepared, "--dir", f"/models/{entry.name}"]
        mounts = {m["name"]: m["mountPath"] for m in _container(deployment)["volumeMounts"]}
        assert mounts["models"] == "/models" == {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["models"]


def test_deployments_keep_probes_pdbs_prestop_and_grace(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, deployment in by_kind(docs, "Deployment").items():
        container, pod = _container(deployment), deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pdbs[name]["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"], name
        if name == "envoy":
            continue
        ports = {p["containerPort"] for p in container["ports"]}
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] in ports, name
        pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pre_stop + float(_env(container)["INFERMESH_GRACE_PERIOD"]), name
        if container["securityContext"].get("readOnlyRootFilesystem"):
            assert "/tmp" in {m["mountPath"] for m in container["volumeMounts"]}, name
    for deployment in _workers(docs).values():
        assert "startupProbe" in _container(deployment)


def test_the_schedulers_find_every_models_workers(variant: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = variant
    services = by_kind(docs, "Service")
    dns = _env(_container(by_kind(docs, "Deployment")["scheduler"]))["INFERMESH_WORKERS_DNS"].split(",")
    found = set()
    for spec in dns:
        name, _, port = spec.partition(":")
        service = services[name]["spec"]
        assert service["clusterIP"] == "None"
        assert int(port) in {p["port"] for p in service["ports"]}
        (model,) = [m for m, d in _workers(docs).items() if d["spec"]["selector"]["matchLabels"] == service["selector"]]
        found.add(model)
    assert found == set(_workers(docs))
    assert "worker-pods" not in services


def test_each_autoscaler_targets_its_own_models_deployment_and_queue(
        variant: tuple[str, list[dict[str, Any]]], demo: Catalog) -> None:
    name, docs = variant
    assert (QUEUE_DEPTH._name, "model") == (k8s_documents.QUEUE_METRIC, QUEUE_DEPTH._labelnames[0])
    scaled, hpas = by_kind(docs, "ScaledObject"), by_kind(docs, "HorizontalPodAutoscaler")
    assert {"frontend", "tokenizer"} <= set(hpas)  # base's, on CPU
    worker_hpas = {n: h for n, h in hpas.items() if n not in ("frontend", "tokenizer")}
    autoscalers = {KEDA: scaled, HPA: worker_hpas, MESH: {}}[name]
    assert not (scaled and worker_hpas), "one of KEDA and HPAs, not both"
    if name == MESH:
        assert not scaled and not worker_hpas
        return
    workers = _workers(docs)
    assert len(autoscalers) == len(workers)
    by_deployment = {d["metadata"]["name"]: model for model, d in workers.items()}
    for autoscaler in autoscalers.values():
        spec = autoscaler["spec"]
        model = by_deployment[spec["scaleTargetRef"]["name"]]
        entry = next(m for m in demo.models if m.name == model)
        if name == KEDA:
            (trigger,) = spec["triggers"]
            assert trigger["type"] == "prometheus"
            assert trigger["metadata"]["query"] == f'sum(infermesh_scheduler_queue_depth{{model="{model}"}})'
            assert float(trigger["metadata"]["threshold"]) > 0
            low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
        else:
            assert spec["scaleTargetRef"]["kind"] == "Deployment"
            (metric,) = spec["metrics"]
            assert metric["type"] == "External"
            assert metric["external"]["metric"] == {"name": "infermesh_scheduler_queue_depth",
                                                    "selector": {"matchLabels": {"model": model}}}
            assert metric["external"]["target"]["type"] == "AverageValue"
            low, high = spec["minReplicas"], spec["maxReplicas"]
        assert low == entry.workers <= high


def test_the_catalog_config_map_is_the_source_file_mounted_into_every_service(
        variant: tuple[str, list[dict[str, Any]]], demo: Catalog, tmp_path: Path) -> None:
    _, docs = variant
    config_map = by_kind(docs, "ConfigMap")["catalog"]  # no hash suffix: an update reaches the running pods
    text = config_map["data"]["catalog.yaml"]
    assert text.encode() == DEMO.read_bytes()
    (tmp_path / "catalog.yaml").write_text(text)
    parsed = load_catalog(tmp_path / "catalog.yaml")
    assert (parsed.models, parsed.routes, parsed.chains, parsed.cooldown, parsed.digest) == \
        (demo.models, demo.routes, demo.chains, demo.cooldown, demo.digest)
    for name, deployment in by_kind(docs, "Deployment").items():
        if name == "envoy":
            continue
        container, pod = _container(deployment), deployment["spec"]["template"]["spec"]
        path = _env(container)["INFERMESH_CATALOG"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == os.path.dirname(path)]
        assert "subPath" not in mount, name  # a subPath mount never sees an update
        assert volumes[mount["name"]]["configMap"]["name"] == "catalog", name
        assert os.path.basename(path) in config_map["data"], name


def test_the_tokenizer_loads_every_model_of_the_catalog(variant: tuple[str, list[dict[str, Any]]],
                                                        demo: Catalog) -> None:
    _, docs = variant
    tokenizer = by_kind(docs, "Deployment")["tokenizer"]
    args = _container(tokenizer)["args"]
    assert args[0] == "tokenizer"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--model"] == \
        [f"{m.name}=/models/{m.name}" for m in demo.models]
    init = tokenizer["spec"]["template"]["spec"]["initContainers"]
    assert [c["args"][1] for c in init] == [m.weights.prepared for m in demo.models]  # base's `model` replaced


# --- the renderer alone ----------------------------------------------------------------------------------------

AWKWARD = """\
format: 1
models:
  - name: team/Chat+Model:v2.eu
    weights: {dir: weights/chat}
    workers: 2
    engine: {dtype: bfloat16, max_num_seqs: 4}
  - name: SmolLM2-135M-Instruct
    weights: {prepared: SmolLM2-135M-Instruct}
    workers: 0
  - name: a-very-long-model-name-that-goes-on-and-on-beyond-any-label-v1
    task: embed
    weights: {prepared: all-MiniLM-L6-v2}
"""


def test_dns_labels() -> None:
    assert k8s_documents.dns_label("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert k8s_documents.dns_label("Qwen2.5-Coder-0.5B-Instruct") == "qwen2-5-coder-0-5b-instruct"
    assert k8s_documents.dns_label("team/Chat+Model:v2.eu") == "team-chat-model-v2-eu"
    long_a, long_b = "x" * 60 + "-a", "x" * 60 + "-b"
    assert len(k8s_documents.dns_label(long_a)) <= k8s_documents.MAX_LABEL
    assert k8s_documents.dns_label(long_a) != k8s_documents.dns_label(long_b)
    clash = parse_catalog("format: 1\nmodels:\n  - {name: Chat.Model, weights: {dir: a}}\n"
                          "  - {name: chat-model, weights: {dir: b}}\n")
    with pytest.raises(k8s_documents.RenderError, match="'Chat.Model' and 'chat-model'"):
        kubernetes.render(clash, b"")


def test_an_awkward_catalog_renders_and_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = tmp_path / "catalog.yaml"
    source.write_text(AWKWARD)
    out = tmp_path / "overlay"
    assert kubernetes.main(["--catalog", str(source), "--out", str(out), "--base", str(K8S / "base")]) == 0
    assert "'team/Chat+Model:v2.eu' is not a Kubernetes label value" in capsys.readouterr().err
    keda, hpa = render(str(out)), render(str(out / "hpa"))
    assert validate(keda + hpa) >= 15
    workers = _workers(keda)
    assert set(workers) == {"team/Chat+Model:v2.eu", "a-very-long-model-name-that-goes-on-and-on-beyond-any-label-v1"}
    chat = workers["team/Chat+Model:v2.eu"]
    assert chat["spec"]["replicas"] == 2
    assert _container(chat)["args"] == ["worker", "--model", "team/Chat+Model:v2.eu=/models/team/Chat+Model:v2.eu",
                                        "--max-num-seqs", "4", "--dtype", "bfloat16"]
    # Directory weights: the model's folder on the operator's claim, no conversion.
    pod = chat["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    claim = {v["name"]: v for v in pod["volumes"]}["weights"]["persistentVolumeClaim"]
    assert claim == {"claimName": k8s_documents.WEIGHTS_CLAIM, "readOnly": True}
    (mount,) = [m for m in _container(chat)["volumeMounts"] if m["name"] == "weights"]
    assert (mount["mountPath"], mount["subPath"]) == ("/models/team/Chat+Model:v2.eu", "team/Chat+Model:v2.eu")
    assert _container(workers["a-very-long-model-name-that-goes-on-and-on-beyond-any-label-v1"])["args"][-2:] == \
        ["--task", "embed"]
    # workers: 0 runs elsewhere: no Deployment, no autoscaler, no DNS name; the tokenizer still loads it.
    dns = _env(_container(by_kind(keda, "Deployment")["scheduler"]))["INFERMESH_WORKERS_DNS"]
    assert "smollm2" not in dns and dns.count(":50060") == 2
    assert "SmolLM2-135M-Instruct=/models/SmolLM2-135M-Instruct" in \
        _container(by_kind(keda, "Deployment")["tokenizer"])["args"]
    assert len(by_kind(keda, "ScaledObject")) == 2
    assert {n for n in by_kind(hpa, "HorizontalPodAutoscaler") if n.startswith("worker-")} == \
        {d["metadata"]["name"] for m, d in workers.items() if m.startswith("a-very-long")}
    assert 'model="team/Chat+Model:v2.eu"' in str(by_kind(keda, "ScaledObject"))
    # No machine path in what is written (kustomize needs the base as a relative path anyway).
    for path in out.rglob("*.yaml"):
        assert str(tmp_path) not in path.read_text(), path
    assert yaml.safe_load((out / "mesh" / "kustomization.yaml").read_text())["resources"][0] == \
        os.path.relpath(K8S / "base", out / "mesh")
