"""A catalog's versions on Kubernetes: each version of a versioned model is a worker Deployment of its own
(`worker-chat-v2`, labels `infermesh.io/model: chat`, `infermesh.io/version: v2`) with its own headless
Service, PDB and autoscaler on its own queue (`model="chat@v2"`); the tokenizer loads every version; and the
overlay's `rollouts/` ships Argo Rollouts AnalysisTemplates of the catalog's rollback rule.

Rendered by kustomize in every variant and validated as base is. Argo's CRD has no schema in
kubernetes-validate: its structure is checked here, and its PromQL is parsed by `promtool` and evaluated by
`promtool test rules` on made-up series, so that a canary worse than the rule returns a value above the
threshold and one with too few requests returns nothing.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from infermesh.common.catalog import Rollback, parse_catalog
from infermesh.scheduler import metrics as scheduler_metrics
from infermesh.supervisor import k8s_analysis, k8s_documents, kubernetes

from tests.deploy.debian import ensure_prometheus
from tests.deploy.test_k8s import K8S, by_kind, render, validate

ROOT = Path(__file__).resolve().parents[2]
CANARY = ROOT / "deploy" / "catalog" / "canary.yaml"
CANARY_OVERLAY = K8S / "overlays" / "catalog-canary"
MODEL, VERSION_KEY = "infermesh.io/model", "infermesh.io/version"
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")

VERSIONED = """\
format: 1
models:
  - name: chat
    aliases: [chat-small]
    stable: v1
    engine: {max_model_len: 2048}
    versions:
      - name: v1
        weights: {prepared: SmolLM2-135M-Instruct}
      - name: v2
        weights: {prepared: SmolLM2-135M-Instruct}
        engine: {max_num_seqs: 4}
        workers: 2
        traffic: 10
      - name: V3.rc_1
        weights: {dir: weights/chat-v3}
        workers: 0
    rollback: {min_requests: 20, max_error_rate: 0.05, window_s: 90}
  - name: all-MiniLM-L6-v2
    task: embed
    weights: {prepared: all-MiniLM-L6-v2}
"""
# What the scheduler exports for versions (`model`: the model's name, `version`: the version's).
VERSION_SERIES = {"infermesh_scheduler_version_requests_total",
                  *(f"infermesh_scheduler_version_{h}_seconds_{s}" for h in ("ttft", "tpot")
                    for s in ("bucket", "sum", "count"))}


@pytest.fixture(scope="module")
def overlay(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("versions")
    (tmp / "catalog.yaml").write_text(VERSIONED)
    out = tmp / "overlay"
    assert kubernetes.main(["--catalog", str(tmp / "catalog.yaml"), "--out", str(out), "--base",
                            str(K8S / "base")]) == 0
    return out


@pytest.fixture(scope="module")
def keda(overlay: Path) -> list[dict[str, Any]]:
    return render(str(overlay))


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def _args(docs: list[dict[str, Any]], name: str) -> list[str]:
    return list(_container(by_kind(docs, "Deployment")[name])["args"])


# --- worker Deployments ------------------------------------------------------------------------------------------

def test_each_version_is_a_worker_deployment_of_its_own(overlay: Path, keda: list[dict[str, Any]]) -> None:
    for variant in (keda, render(str(overlay / "hpa")), render(str(overlay / "mesh"))):
        assert validate(variant) >= 15
        workers = {n: d for n, d in by_kind(variant, "Deployment").items() if n.startswith("worker-")}
        # chat@V3.rc_1 has `workers: 0`: its workers run elsewhere, no Deployment.
        assert set(workers) == {"worker-chat-v1", "worker-chat-v2", "worker-all-minilm-l6-v2"}
        v1, v2 = workers["worker-chat-v1"], workers["worker-chat-v2"]
        assert (v1["spec"]["replicas"], v2["spec"]["replicas"]) == (1, 2)
        assert v2["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/component": "worker", MODEL: "chat",
                                                         VERSION_KEY: "v2"}
        assert v2["spec"]["template"]["metadata"]["labels"][VERSION_KEY] == "v2"
        assert v2["metadata"]["annotations"] == {MODEL: "chat", VERSION_KEY: "v2"}
        # The version's own name, its weights' directory, the model's options under the version's own.
        assert _container(v2)["args"] == ["worker", "--model", "chat@v2=/models/chat@v2", "--max-model-len", "2048",
                                          "--max-num-seqs", "4"]
        assert _container(v1)["args"] == ["worker", "--model", "chat@v1=/models/chat@v1", "--max-model-len", "2048"]
        (init,) = v2["spec"]["template"]["spec"]["initContainers"]
        assert init["args"] == ["prepare-model", "SmolLM2-135M-Instruct", "--dir", "/models/chat@v2"]
        # A plain model keeps no version label.
        assert VERSION_KEY not in workers["worker-all-minilm-l6-v2"]["spec"]["selector"]["matchLabels"]
        # No Deployment selects another's pods.
        for name, deployment in workers.items():
            selector = deployment["spec"]["selector"]["matchLabels"].items()
            others = [n for n, d in workers.items() if selector <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert others == [name]


def test_names_are_dns_labels_and_labels_are_label_values(keda: list[dict[str, Any]]) -> None:
    for doc in keda:
        if doc["kind"] in ("Deployment", "Service", "PodDisruptionBudget", "ScaledObject"):
            assert DNS_LABEL.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
        for value in doc["metadata"].get("labels", {}).values():
            assert k8s_documents.is_label_value(value), (doc["metadata"]["name"], value)
    assert "@" not in yaml.safe_dump([d["metadata"].get("labels") for d in keda])


def test_each_version_has_its_service_and_the_schedulers_find_them(keda: list[dict[str, Any]]) -> None:
    services, deployments = by_kind(keda, "Service"), by_kind(keda, "Deployment")
    env = {e["name"]: e.get("value") for e in _container(deployments["scheduler"])["env"]}
    dns = env["INFERMESH_WORKERS_DNS"].split(",")
    assert dns == ["worker-chat-v1-pods:50060", "worker-chat-v2-pods:50060", "worker-all-minilm-l6-v2-pods:50060"]
    for name in ("worker-chat-v1", "worker-chat-v2"):
        assert services[f"{name}-pods"]["spec"]["selector"] == deployments[name]["spec"]["selector"]["matchLabels"]
        assert by_kind(keda, "PodDisruptionBudget")[name]["spec"]["selector"]["matchLabels"] == \
            deployments[name]["spec"]["selector"]["matchLabels"]


def test_each_version_scales_on_its_own_queue(overlay: Path, keda: list[dict[str, Any]]) -> None:
    assert (scheduler_metrics.QUEUE_DEPTH._name, "model") == (k8s_documents.QUEUE_METRIC,
                                                              scheduler_metrics.QUEUE_DEPTH._labelnames[0])
    scaled = by_kind(keda, "ScaledObject")
    assert set(scaled) == {"worker-chat-v1", "worker-chat-v2", "worker-all-minilm-l6-v2"}
    for name, served, low in (("worker-chat-v1", "chat@v1", 1), ("worker-chat-v2", "chat@v2", 2)):
        spec = scaled[name]["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        (trigger,) = spec["triggers"]
        # The scheduler's queues are per served name: what the Deployment's workers serve.
        assert trigger["metadata"]["query"] == f'sum(infermesh_scheduler_queue_depth{{model="{served}"}})'
        assert _args(keda, name)[2].partition("=")[0] == served
        assert spec["minReplicaCount"] == low <= spec["maxReplicaCount"]
        assert scaled[name]["metadata"]["labels"][VERSION_KEY] == served.partition("@")[2]
    # `chat@v2` is no label value, so an HPA cannot select its series: hpa/ scales the plain model only.
    hpas = {n for n in by_kind(render(str(overlay / "hpa")), "HorizontalPodAutoscaler") if n.startswith("worker-")}
    assert hpas == {"worker-all-minilm-l6-v2"}
    assert kubernetes.without_hpa(parse_catalog(VERSIONED)) == ["chat@v1", "chat@v2"]


def test_the_tokenizer_loads_every_version(keda: list[dict[str, Any]]) -> None:
    tokenizer = by_kind(keda, "Deployment")["tokenizer"]
    args = _container(tokenizer)["args"]
    # Versions of the same prepared weights share one conversion; a `dir` version is its folder on the claim.
    assert [args[i + 1] for i, a in enumerate(args) if a == "--model"] == [
        "chat@v1=/models/chat@v1", "chat@v2=/models/chat@v1", "chat@V3.rc_1=/models/chat@V3.rc_1",
        "all-MiniLM-L6-v2=/models/all-MiniLM-L6-v2"]
    pod = tokenizer["spec"]["template"]["spec"]
    assert [c["args"][1:] for c in pod["initContainers"]] == [["SmolLM2-135M-Instruct", "--dir", "/models/chat@v1"],
                                                              ["all-MiniLM-L6-v2", "--dir", "/models/all-MiniLM-L6-v2"]]
    (claim,) = [m for m in _container(tokenizer)["volumeMounts"] if m["name"] == "weights"]
    assert (claim["mountPath"], claim["subPath"]) == ("/models/chat@V3.rc_1", "chat@V3.rc_1")


@pytest.mark.parametrize(("models", "message"), [
    ("  - {name: chat-v2, weights: {dir: a}}\n"
     "  - {name: chat, stable: v1, versions: [{name: v1, weights: {dir: b}}, {name: v2, weights: {dir: c}}]}\n",
     "the models 'chat-v2' and 'chat@v2' both become the Deployment worker-chat-v2"),
    ("  - {name: chat, stable: v2, versions: [{name: v2, weights: {dir: b}}, {name: V2, weights: {dir: c}}]}\n",
     "'chat@v2' and 'chat@V2' both become the Deployment worker-chat-v2"),
    ("  - {name: Chat, weights: {dir: a}}\n"
     "  - {name: chat, stable: v1, versions: [{name: v1, weights: {dir: b}}]}\n",
     f"the models 'Chat' and 'chat' both become the label {MODEL}=chat"),
    # A long name is cut and ends in a hash of the served name: the Deployments differ, the version labels not.
    (f"  - {{name: {'x' * 50}, stable: v2, versions: [{{name: v2, weights: {{dir: b}}}}, {{name: V2, weights: "
     "{dir: c}}]}\n", f"@v2' and '{'x' * 50}@V2' both become the label {VERSION_KEY}=v2 of '{'x' * 50}'"),
])
def test_names_that_would_meet_on_kubernetes_are_refused(models: str, message: str) -> None:
    with pytest.raises(k8s_documents.RenderError, match=re.escape(message)):
        kubernetes.render(parse_catalog("format: 1\nmodels:\n" + models), b"")


# --- the AnalysisTemplates -----------------------------------------------------------------------------------------

def _templates(overlay: Path) -> dict[str, dict[str, Any]]:
    docs = render(str(overlay / "rollouts"))
    assert {d["kind"] for d in docs} == {"AnalysisTemplate"}
    assert validate(docs) == 0  # Argo's CRD: no schema offline, checked below
    return by_kind(docs, "AnalysisTemplate")


def _args_of(template: dict[str, Any]) -> dict[str, str | None]:
    return {a["name"]: a.get("value") for a in template["spec"]["args"]}


def test_the_analysis_templates_structure(overlay: Path) -> None:
    templates = _templates(overlay)
    assert set(templates) == {"infermesh-canary", "infermesh-canary-chat"}
    defaults = Rollback()
    assert (defaults.max_error_rate, defaults.max_ttft_ratio, defaults.max_tpot_ratio) == (0.01, 1.5, 1.5)
    expected = {  # the generic template: the catalog's defaults; the model's: its own rule (error rate 5 %, 90 s)
        "infermesh-canary": ({"model": None, "version": None, "stable-version": None}, "60s", 0.01),
        "infermesh-canary-chat": ({"model": "chat", "version": None, "stable-version": "v1"}, "90s", 0.05),
    }
    for name, template in templates.items():
        given, interval, error_rate = expected[name]
        assert template["apiVersion"] == "argoproj.io/v1alpha1"
        assert template["metadata"]["namespace"] == "infermesh"
        assert template["metadata"]["labels"]["app.kubernetes.io/part-of"] == "infermesh"
        assert DNS_LABEL.fullmatch(template["metadata"]["name"])
        assert _args_of(template) == {**given, "prometheus": k8s_documents.Options().prometheus}
        metrics = {m["name"]: m for m in template["spec"]["metrics"]}
        assert set(metrics) == {"error-rate", "ttft-ratio", "tpot-ratio"}
        limits = {"error-rate": error_rate, "ttft-ratio": 1.5, "tpot-ratio": 1.5}
        for metric_name, metric in metrics.items():
            assert metric["successCondition"] == f"len(result) == 0 || result[0] <= {limits[metric_name]:g}"
            assert metric["failureLimit"] == 0
            assert metric["interval"] == interval
            assert set(metric["provider"]) == {"prometheus"}
            assert metric["provider"]["prometheus"]["address"] == "{{args.prometheus}}"
            assert f"[{interval}]" in metric["provider"]["prometheus"]["query"]


def _balanced(text: str) -> bool:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # brackets inside strings do not count
    stack, pairs = [], {")": "(", "]": "[", "}": "{"}
    for char in text:
        if char in "([{":
            stack.append(char)
        elif char in pairs and (not stack or stack.pop() != pairs[char]):
            return False
    return not stack


def _substituted(query: str, args: dict[str, str]) -> str:
    found = set(re.findall(r"\{\{args\.([-\w]+)\}\}", query))
    assert found <= set(args), found - set(args)
    for name, value in args.items():
        query = query.replace("{{args." + name + "}}", value)
    assert "{{" not in query
    return query


ARGS = {"model": "chat", "version": "v2", "stable-version": "v1", "prometheus": "http://prometheus:9090"}


def test_the_queries_parse_and_name_only_what_the_scheduler_exports(overlay: Path, tmp_path: Path) -> None:
    assert (scheduler_metrics.VERSION_REQUESTS._name + "_total", scheduler_metrics.VERSION_TTFT._name,
            scheduler_metrics.VERSION_TPOT._name) == (k8s_analysis.VERSION_REQUESTS, k8s_analysis.VERSION_TTFT,
                                                      k8s_analysis.VERSION_TPOT)
    assert {"model", "version"} <= set(scheduler_metrics.VERSION_TTFT._labelnames)
    assert "ok" in scheduler_metrics.VERSION_OUTCOMES
    queries = {f"{t}/{m['name']}": _substituted(m["provider"]["prometheus"]["query"], ARGS)
               for t, template in _templates(overlay).items() for m in template["spec"]["metrics"]}
    for name, query in queries.items():
        assert _balanced(query), name
        series = set(re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{", query))
        assert series and series <= VERSION_SERIES, (name, series - VERSION_SERIES)
        assert 'version="v2"' in query and 'version="v1"' in query, name  # the canary against the stable version
    # promtool parses each one as Prometheus would.
    _, promtool = ensure_prometheus()
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": [{"name": "analysis", "rules": [
        {"record": "infermesh:" + re.sub(r"\W", "_", n), "expr": q} for n, q in queries.items()]}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _balanced("(a{b=\"(\"}[1m])") and not _balanced("sum(a{b=\"c\"}[1m]") and not _balanced("a{b)")


def _counter(version: str, outcome: str, per_step: float) -> dict[str, str]:
    return {"series": f'infermesh_scheduler_version_requests_total{{model="chat",version="{version}",'
                      f'outcome="{outcome}"}}', "values": f"0+{per_step:g}x20"}


def _buckets(metric: str, version: str, per_step: dict[str, float]) -> list[dict[str, str]]:
    return [{"series": f'{metric}_bucket{{model="chat",version="{version}",le="{le}"}}', "values": f"0+{n:g}x20"}
            for le, n in per_step.items()]


def test_the_queries_decide_as_the_catalogs_rule(tmp_path: Path) -> None:
    """Series every 15 s for 5 minutes, each query evaluated at the end (the generic template: 100 requests
    in 60 s at least; 0.01 errors; 1.5 times the stable version's p95)."""
    template = k8s_analysis.analysis_template(k8s_documents.Options())
    query = {m["name"]: "round(" + _substituted(m["provider"]["prometheus"]["query"], ARGS) + ", 0.001)"
             for m in template["spec"]["metrics"]}

    def case(series: list[dict[str, str]], metric: str, value: float | None) -> dict[str, Any]:
        expected = [{"labels": "{}", "value": value}] if value is not None else []
        return {"interval": "15s", "input_series": series,
                "promql_expr_test": [{"expr": query[metric], "eval_time": "5m", "exp_samples": expected}]}

    ttft = "infermesh_scheduler_version_ttft_seconds"
    slow = _buckets(ttft, "v2", {"0.1": 0, "0.2": 0, "0.4": 60, "+Inf": 60})  # p95 0.39 s
    fast = _buckets(ttft, "v1", {"0.1": 0, "0.2": 100, "0.4": 100, "+Inf": 100})  # p95 0.195 s
    tests = [
        # 5 % of the canary's 240 requests a minute failed, none of the stable version's: its error rate.
        case([_counter("v2", "ok", 57), _counter("v2", "failed", 3), _counter("v1", "ok", 100),
              _counter("v1", "failed", 0)], "error-rate", 0.05),
        # ... the stable version fails as often (10 %): not the canary's fault, nothing.
        case([_counter("v2", "ok", 57), _counter("v2", "failed", 3), _counter("v1", "ok", 90),
              _counter("v1", "failed", 10)], "error-rate", None),
        # ... the stable version served nothing: the canary's rate all the same.
        case([_counter("v2", "ok", 57), _counter("v2", "timeout", 3), _counter("v1", "ok", 0)], "error-rate", 0.05),
        # ... 80 requests a minute are too few to decide: nothing.
        case([_counter("v2", "ok", 19), _counter("v2", "worker_lost", 1), _counter("v1", "ok", 100)],
             "error-rate", None),
        # The canary's p95 TTFT is twice the stable version's.
        case([*slow, *fast, _counter("v2", "ok", 60), _counter("v1", "ok", 100)], "ttft-ratio", 2.0),
        # ... but the stable version had too few requests to compare with: nothing.
        case([*slow, *fast, _counter("v2", "ok", 60), _counter("v1", "ok", 10)], "ttft-ratio", None),
    ]
    (tmp_path / "tests.yml").write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "15s",
                                                         "tests": tests}))
    _, promtool = ensure_prometheus()
    result = subprocess.run([promtool, "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the committed overlays --------------------------------------------------------------------------------------

def test_the_committed_canary_overlay_is_what_its_catalog_renders() -> None:
    data = CANARY.read_bytes()
    catalog = parse_catalog(data, str(CANARY))
    files = kubernetes.render(catalog, data)
    committed = {str(p.relative_to(CANARY_OVERLAY)): p.read_bytes() for p in CANARY_OVERLAY.rglob("*") if p.is_file()}
    assert sorted(committed) == sorted(files), "render again: infermesh k8s-manifests --catalog " \
        "deploy/catalog/canary.yaml --out deploy/k8s/overlays/catalog-canary"
    for path, content in files.items():
        assert committed[path] == content, f"{path} is not what the catalog renders now"
    docs = render("overlays/catalog-canary")
    assert validate(docs) >= 15
    versioned = next(m for m in catalog.models if m.versions)
    workers = {n for n in by_kind(docs, "Deployment") if n.startswith("worker-")}
    assert workers == {f"worker-{k8s_documents.dns_label(v.name)}" for v in versioned.versions if v.workers}
    templates = _templates(CANARY_OVERLAY)
    own = templates[f"infermesh-canary-{k8s_documents.dns_label(versioned.name)}"]
    assert _args_of(own)["stable-version"] == versioned.stable
    limit = next(m for m in own["spec"]["metrics"] if m["name"] == "error-rate")["successCondition"]
    assert limit.endswith(f"<= {versioned.rollback.max_error_rate:g}")


def test_the_demo_overlay_ships_the_generic_template() -> None:
    templates = _templates(K8S / "overlays" / "catalog-demo")
    assert set(templates) == {"infermesh-canary"}  # the demo catalog has no versioned model
