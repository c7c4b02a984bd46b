"""The Kubernetes documents of a catalog's overlay: names, worker Deployments, autoscalers, patches of base.

`infermesh k8s-manifests` (infermesh.supervisor.kubernetes) puts them together into the overlay. What
each served model (a model, or one version of a versioned model) becomes:

- the Deployment `worker-LABEL`, LABEL being `dns_label` of its served name (`chat@v2` → `chat-v2`),
  with `entry.workers` replicas, running `worker --model NAME=/models/NAME`, the entry's engine flags
  and, for an embed model, `--task embed`; its pods labelled `infermesh.io/model: <the model's label>`
  and, for a version, `infermesh.io/version: <the version's label>` (label values are DNS labels too:
  a name such as `team/Chat+Model` is no label value; the exact names are annotations of the same keys).
  A served model with `workers: 0` runs its workers elsewhere: it gets no Deployment.
- its headless Service `worker-LABEL-pods`, by which the schedulers find its workers, and a PDB;
- a KEDA ScaledObject on `sum(infermesh_scheduler_queue_depth{model="NAME"})` (the scheduler's queues
  are per served name: a version's is `model="chat@v2"`), or an `autoscaling/v2` HPA on the External
  metric of the same series, which only a name that is a label value can select.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from infermesh.common.catalog import VERSION_SEP, Catalog, ModelEntry

Doc = dict[str, Any]

NAMESPACE = "infermesh"  # base's
CATALOG_CONFIG_MAP = "catalog"
CATALOG_FILE = "catalog.yaml"
CATALOG_DIR = "/etc/infermesh/catalog"
MODELS_DIR = "/models"
WEIGHTS_CLAIM = "infermesh-models"  # where `weights.dir` models are read from
WORKER_PORT, WORKER_METRICS_PORT = 50060, 9110
QUEUE_METRIC = "infermesh_scheduler_queue_depth"  # infermesh.scheduler.metrics.QUEUE_DEPTH, labels model, priority
MODEL_LABEL = "infermesh.io/model"
VERSION_LABEL = "infermesh.io/version"
COMPONENT_LABEL = "app.kubernetes.io/component"
MAX_LABEL = 38  # worker-LABEL-pods is a DNS label (<= 63), and so are the pods' names
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


class RenderError(ValueError):
    """The catalog is valid but cannot be rendered for Kubernetes (two models with one Kubernetes name)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the overlay needs beyond the catalog; the defaults are base's."""

    base: str = "../../base"  # base's kustomization, relative to the overlay's folder (or a remote URL)
    prometheus: str = "http://prometheus.monitoring.svc:9090"  # KEDA's (and the AnalysisTemplates') Prometheus
    queue_threshold: int = 8  # requests waiting per worker before another one is added
    max_workers: int = 8  # the autoscalers' maximum (at least the model's `workers`)


# --- names -----------------------------------------------------------------------------------------------------

def dns_label(name: str) -> str:
    """A name as a DNS label: lower case, each run of other characters one '-'; a name longer than
    MAX_LABEL is cut and ends in 8 hex digits of its SHA-256, so that it stays apart from its neighbours."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
    if len(label) > MAX_LABEL:
        label = label[:MAX_LABEL - 9].rstrip("-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return label


def _unique(names: Iterable[str], what: str, becomes: str,
            key: Callable[[str], str] = lambda name: name) -> dict[str, str]:
    """Each name's DNS label (of `key(name)`); a RenderError when two names would share one."""
    labels: dict[str, str] = {}
    owner: dict[str, str] = {}
    for name in names:
        label = dns_label(key(name))
        if label in owner:
            raise RenderError(f"the {what} {owner[label]!r} and {name!r} both become {becomes.format(label)} on "
                              "Kubernetes: rename one of them")
        owner[label], labels[name] = name, label
    return labels


def model_labels(catalog: Catalog) -> dict[str, str]:
    """Each model's DNS label (its pods' `infermesh.io/model`), by model name; a RenderError on a clash."""
    return _unique((m.name for m in catalog.models), "models", f"the label {MODEL_LABEL}={{}}")


def served_labels(catalog: Catalog) -> dict[str, str]:
    """The LABEL of `worker-LABEL` for each served model (each version of a versioned model, `chat@v2` →
    `chat-v2`), by served name; a RenderError when two models, two versions or a model and a version would
    share one, or would select each other's pods."""
    model_labels(catalog)
    labels = _unique((e.name for e in catalog.served_models()), "models", "the Deployment worker-{}")
    for m in catalog.models:  # long names end in a hash of the whole served name, not of the version's
        _unique((v.name for v in m.versions), "versions", f"the label {VERSION_LABEL}={{}} of {m.name!r}",
                key=lambda name: name.rpartition(VERSION_SEP)[2])
    return labels


def worker_labels(entry: ModelEntry) -> dict[str, str]:
    """The labels of a served model's worker pods: the selector of its Deployment, Service and PDB."""
    labels = {COMPONENT_LABEL: "worker", MODEL_LABEL: dns_label(entry.model or entry.name)}
    return {**labels, VERSION_LABEL: dns_label(entry.version)} if entry.version else labels


def worker_annotations(entry: ModelEntry) -> dict[str, str]:
    """The exact names, which label values cannot always hold."""
    names = {MODEL_LABEL: entry.model or entry.name}
    return {**names, VERSION_LABEL: entry.version} if entry.version else names


def worker_name(label: str) -> str:
    return f"worker-{label}"


def workers_service(label: str) -> str:
    return f"worker-{label}-pods"


def model_dir(entry: ModelEntry) -> str:
    return f"{MODELS_DIR}/{entry.name}"


def queue_query(model: str) -> str:
    """The PromQL of a model's queue depth, summed over priorities and schedulers (each holds its own queue)."""
    return f'sum({QUEUE_METRIC}{{model="{promql_string(model)}"}})'


def promql_string(text: str) -> str:
    """`text` inside a double-quoted PromQL string."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def is_label_value(text: str) -> bool:
    return bool(_LABEL_VALUE.fullmatch(text))


def worker_args(entry: ModelEntry) -> list[str]:
    """`infermesh worker`'s arguments for the model's workers."""
    args = ["worker", "--model", f"{entry.name}={model_dir(entry)}", *entry.engine.worker_args()]
    return args + ["--task", "embed"] if entry.task == "embed" else args


# --- pieces ------------------------------------------------------------------------------------------------------

_DROP_ALL: Doc = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
CATALOG_ENV: Doc = {"name": "INFERMESH_CATALOG", "value": f"{CATALOG_DIR}/{CATALOG_FILE}"}
CATALOG_MOUNT: Doc = {"name": "catalog", "mountPath": CATALOG_DIR, "readOnly": True}
CATALOG_VOLUME: Doc = {"name": "catalog", "configMap": {"name": CATALOG_CONFIG_MAP}}


def _grpc_probe(period: int, failures: int) -> Doc:
    return {"grpc": {"port": WORKER_PORT}, "periodSeconds": period, "failureThreshold": failures}


@dataclasses.dataclass
class PodWeights:
    """The weights of some served models in a pod."""

    init: list[Doc]  # init containers converting prepared models into the `models` volume
    volumes: list[Doc]
    mounts: list[Doc]  # the main container's
    dirs: dict[str, str]  # the directory each served model is read from in the pod, by served name


def weights(entries: Iterable[ModelEntry], labels: dict[str, str]) -> PodWeights:
    """The models' weights in a pod.

    Prepared models are converted into the `models` volume at /models/NAME by one init container each
    (once per prepared model: versions of the same weights share the first one's directory); `dir` models
    are the PersistentVolumeClaim's NAME, mounted at /models/NAME.
    """
    entries = list(entries)
    found = PodWeights([], [], [], {})
    if any(e.weights.prepared for e in entries):
        found.volumes.append({"name": "models", "emptyDir": {}})
        found.mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if any(not e.weights.prepared for e in entries):
        found.volumes.append({"name": "weights",
                              "persistentVolumeClaim": {"claimName": WEIGHTS_CLAIM, "readOnly": True}})
    converted: dict[str, str] = {}
    for entry in entries:
        prepared = entry.weights.prepared
        if prepared in converted:
            found.dirs[entry.name] = converted[prepared]
            continue
        found.dirs[entry.name] = model_dir(entry)
        if prepared:
            converted[prepared] = model_dir(entry)
            found.init.append({"name": f"prepare-{labels[entry.name]}", "image": "infermesh-cpu",
                               "args": ["prepare-model", prepared, "--dir", model_dir(entry)],
                               "volumeMounts": [{"name": "home", "mountPath": "/var/lib/infermesh"},
                                                {"name": "models", "mountPath": MODELS_DIR}],
                               "securityContext": _DROP_ALL})
        else:
            found.mounts.append({"name": "weights", "mountPath": model_dir(entry), "subPath": entry.name,
                                 "readOnly": True})
    return found


def worker_documents(entry: ModelEntry, label: str) -> list[Doc]:
    """The served model's worker Deployment (in the style of base's `worker`), its headless Service and PDB."""
    selector = worker_labels(entry)
    annotations = worker_annotations(entry)
    name = worker_name(label)
    pod_weights = weights([entry], {entry.name: label})
    container = {
        "name": "worker",
        "image": "infermesh-cpu",
        "args": worker_args(entry),
        "env": [{"name": "INFERMESH_PORT", "value": str(WORKER_PORT)},
                {"name": "INFERMESH_METRICS_PORT", "value": str(WORKER_METRICS_PORT)},
                {"name": "INFERMESH_GRACE_PERIOD", "value": "60"},
                {"name": "INFERMESH_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                CATALOG_ENV],
        "ports": [{"name": "grpc", "containerPort": WORKER_PORT},
                  {"name": "metrics", "containerPort": WORKER_METRICS_PORT}],
        # The engine warms up for minutes: liveness waits for the startup probe.
        "startupProbe": _grpc_probe(5, 180),
        "readinessProbe": _grpc_probe(5, 2),
        "livenessProbe": _grpc_probe(10, 6),
        # The schedulers re-resolve the headless Service every 5 s; then SIGTERM drains what the pod runs.
        "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}},
        "volumeMounts": [{"name": "home", "mountPath": "/var/lib/infermesh"}, *pod_weights.mounts, CATALOG_MOUNT,
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": _DROP_ALL,
    }
    pod: Doc = {
        # preStop (10 s) + the drain of in-flight streams (60 s) + margin.
        "terminationGracePeriodSeconds": 90,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        **({"initContainers": pod_weights.init} if pod_weights.init else {}),
        "containers": [container],
        "volumes": [{"name": "home", "emptyDir": {}}, *pod_weights.volumes, CATALOG_VOLUME,
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": selector, "annotations": annotations},
        "spec": {
            "replicas": entry.workers,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector,
                             "annotations": {**annotations, "prometheus.io/scrape": "true",
                                             "prometheus.io/port": str(WORKER_METRICS_PORT)}},
                "spec": pod,
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": workers_service(label), "labels": selector},
        "spec": {"clusterIP": "None", "selector": selector,
                 "ports": [{"name": "grpc", "port": WORKER_PORT, "targetPort": "grpc",
                            "appProtocol": "kubernetes.io/h2c"},
                           {"name": "metrics", "port": WORKER_METRICS_PORT, "targetPort": "metrics"}]},
    }
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": name, "labels": selector},
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}
    return [deployment, service, pdb]


def _bounds(entry: ModelEntry, options: Options) -> tuple[int, int]:
    return entry.workers, max(entry.workers, options.max_workers)


_SCALE_DOWN: Doc = {"stabilizationWindowSeconds": 600, "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}


def scaled_object(entry: ModelEntry, label: str, options: Options) -> Doc:
    """KEDA: the served model's Deployment scaled on the requests waiting for it (as base's `worker`)."""
    low, high = _bounds(entry, options)
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": worker_name(label), "labels": worker_labels(entry)},
        "spec": {
            "scaleTargetRef": {"name": worker_name(label)},
            "minReplicaCount": low, "maxReplicaCount": high,
            "pollingInterval": 15, "cooldownPeriod": 600,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": _SCALE_DOWN}}},
            "triggers": [{"type": "prometheus",
                          "metadata": {"serverAddress": options.prometheus, "query": queue_query(entry.name),
                                       "threshold": str(options.queue_threshold)}}],
        },
    }


def horizontal_pod_autoscaler(entry: ModelEntry, label: str, options: Options) -> Doc:
    """The HPA alternative: the External metric `infermesh_scheduler_queue_depth{model=NAME}` per worker."""
    low, high = _bounds(entry, options)
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": worker_name(label), "labels": worker_labels(entry)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker_name(label)},
            "minReplicas": low, "maxReplicas": high,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": QUEUE_METRIC, "selector": {"matchLabels": {"model": entry.name}}},
                "target": {"type": "AverageValue", "averageValue": str(options.queue_threshold)}}}],
            "behavior": {"scaleDown": _SCALE_DOWN},
        },
    }


def service_patches(catalog: Catalog, labels: dict[str, str], with_workers: Sequence[ModelEntry]) -> dict[str, Doc]:
    """Strategic-merge patches of base: the catalog in every service, the tokenizer loading every served model,
    the schedulers watching the workers of every served model that has some."""

    def patch(name: str, pod: Doc, container: Doc) -> Doc:
        container = {"name": name, **container}
        container["env"] = [*container.get("env", []), CATALOG_ENV]
        container["volumeMounts"] = [*container.get("volumeMounts", []), CATALOG_MOUNT]
        pod = {**pod, "containers": [container], "volumes": [*pod.get("volumes", []), CATALOG_VOLUME]}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"template": {"spec": pod}}}

    served = catalog.served_models()
    pod_weights = weights(served, labels)
    tokenizer_args = ["tokenizer"] + [a for e in served for a in ("--model", f"{e.name}={pod_weights.dirs[e.name]}")]
    dns = ",".join(f"{workers_service(labels[e.name])}:{WORKER_PORT}" for e in with_workers)
    return {
        # Base's tokenizer converts the default model; here every served model of the catalog, into /models.
        "tokenizer": patch("tokenizer", {"initContainers": [{"name": "model", "$patch": "delete"}, *pod_weights.init],
                                         "volumes": pod_weights.volumes},
                           {"args": tokenizer_args, "volumeMounts": pod_weights.mounts}),
        "scheduler": patch("scheduler", {}, {"env": [{"name": "INFERMESH_WORKERS_DNS", "value": dns}]}),
        "frontend": patch("frontend", {}, {}),
    }


def base_worker_deletions() -> dict[str, Doc]:
    """Base's single worker (Deployment, headless Service, PDB, ScaledObject), removed: the models' replace it.

    One patch per file: kustomize 5.5 fails on several deletions in one file.
    """
    kinds = [("apps/v1", "Deployment", "worker"), ("v1", "Service", "worker-pods"),
             ("policy/v1", "PodDisruptionBudget", "worker"), ("keda.sh/v1alpha1", "ScaledObject", "worker")]
    return {f"base-worker-{kind.lower()}": {"$patch": "delete", "apiVersion": api, "kind": kind,
                                            "metadata": {"name": name}}
            for api, kind, name in kinds}
