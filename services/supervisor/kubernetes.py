"""`infermesh k8s-manifests`: a catalog's Kubernetes overlay, rendered from the catalog alone.

On Kubernetes the catalog stays the single source of truth: this module turns
it into a kustomize overlay on `deploy/k8s/base`, and nothing in the overlay is
written by hand (`deploy/k8s/overlays/catalog-demo/` is the demo catalog's, and
a test checks it is what this renders now). The overlay, in `--out DIR`:

    DIR/kustomization.yaml       the mesh, workers scaled by KEDA:     kubectl apply -k DIR
    DIR/scaledobjects.yaml       per model, a ScaledObject on that model's own queue depth
    DIR/hpa/kustomization.yaml   the mesh, workers scaled by HPAs:     kubectl apply -k DIR/hpa
    DIR/hpa/hpas.yaml            per model, an HPA on the External metric of the same series
    DIR/mesh/kustomization.yaml  base and the catalog, fixed replicas: kubectl apply -k DIR/mesh
    DIR/mesh/catalog.yaml        the catalog file, byte for byte (the ConfigMap `catalog`)
    DIR/mesh/workers.yaml        per model, a worker Deployment, its headless Service and a PDB
    DIR/mesh/patches/*.yaml      base's single worker removed; the catalog mounted into every service

- The ConfigMap `catalog` holds the file itself and is mounted (as a directory,
  so that an update reaches the pods and the services reload it) at
  `/etc/infermesh/catalog/`, with `INFERMESH_CATALOG` naming the file, in the
  tokenizer, the scheduler, the frontend and every worker. Its name carries no
  hash: changing the catalog does not restart the pods.
- A model gets the Deployment `worker-LABEL` (LABEL: `dns_label` of its name,
  also its `infermesh.io/model` label) with `entry.workers` replicas, running
  `worker --model NAME=/models/NAME`, the entry's engine flags and, for an
  embed model, `--task embed`. A model with `workers: 0` runs its workers
  elsewhere: it gets no Deployment (the tokenizer still loads it).
- Weights: a `prepared` model is converted into the pod's `models` volume by
  an init container (`prepare-model NAME --dir /models/NAME`), as base does
  for the default model; a `dir` model is read from the PersistentVolumeClaim
  `infermesh-models` (which the operator provides) at the model's name.
- The schedulers find each model's workers through its headless Service
  `worker-LABEL-pods` (`INFERMESH_WORKERS_DNS` lists them all).
- Autoscaling, one of two: KEDA on `sum(infermesh_scheduler_queue_depth{model="NAME"})`,
  or an `autoscaling/v2` HPA on the External metric `infermesh_scheduler_queue_depth`
  with the selector `model=NAME` (served by an adapter such as prometheus-adapter).
  Both scale between the model's `workers` and `--max-workers`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from infermesh.common.catalog import Catalog, CatalogError, ModelEntry, parse_catalog

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
COMPONENT_LABEL = "app.kubernetes.io/component"
MAX_LABEL = 38  # worker-LABEL-pods is a DNS label (<= 63), and so are the pods' names
_LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")

HEADER = ("# Rendered by `infermesh k8s-manifests` from the catalog (mesh/catalog.yaml is its copy): change the\n"
          "# catalog and render again (docs/catalog.md, \"On Kubernetes\") rather than editing this file.\n")


class RenderError(ValueError):
    """The catalog is valid but cannot be rendered for Kubernetes (two models with one Kubernetes name)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What the overlay needs beyond the catalog; the defaults are base's."""

    base: str = "../../base"  # base's kustomization, relative to the overlay's folder (or a remote URL)
    prometheus: str = "http://prometheus.monitoring.svc:9090"  # KEDA's Prometheus
    queue_threshold: int = 8  # requests waiting per worker before another one is added
    max_workers: int = 8  # the autoscalers' maximum (at least the model's `workers`)


# --- names -----------------------------------------------------------------------------------------------------

def dns_label(name: str) -> str:
    """A model name as a DNS label: lower case, each run of other characters one '-'; a name longer than
    MAX_LABEL is cut and ends in 8 hex digits of its SHA-256, so that it stays apart from its neighbours."""
    label = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"
    if len(label) > MAX_LABEL:
        label = label[:MAX_LABEL - 9].rstrip("-") + "-" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return label


def model_labels(catalog: Catalog) -> dict[str, str]:
    """Each model's DNS label, by model name; a RenderError when two models would share one."""
    labels: dict[str, str] = {}
    owner: dict[str, str] = {}
    for entry in catalog.models:
        label = dns_label(entry.name)
        if label in owner:
            raise RenderError(f"the models {owner[label]!r} and {entry.name!r} both become the Kubernetes name "
                              f"worker-{label}: rename one of them")
        owner[label], labels[entry.name] = entry.name, label
    return labels


def worker_name(label: str) -> str:
    return f"worker-{label}"


def workers_service(label: str) -> str:
    return f"worker-{label}-pods"


def model_dir(entry: ModelEntry) -> str:
    return f"{MODELS_DIR}/{entry.name}"


def queue_query(model: str) -> str:
    """The PromQL of a model's queue depth, summed over priorities and schedulers (each holds its own queue)."""
    quoted = model.replace("\\", "\\\\").replace('"', '\\"')
    return f'sum({QUEUE_METRIC}{{model="{quoted}"}})'


def is_label_value(text: str) -> bool:
    return bool(_LABEL_VALUE.fullmatch(text))


def worker_args(entry: ModelEntry) -> list[str]:
    """`infermesh worker`'s arguments for the model's workers."""
    args = ["worker", "--model", f"{entry.name}={model_dir(entry)}", *entry.engine.worker_args()]
    return args + ["--task", "embed"] if entry.task == "embed" else args


# --- pieces ------------------------------------------------------------------------------------------------------

_DROP_ALL: Doc = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
_CATALOG_ENV: Doc = {"name": "INFERMESH_CATALOG", "value": f"{CATALOG_DIR}/{CATALOG_FILE}"}
_CATALOG_MOUNT: Doc = {"name": "catalog", "mountPath": CATALOG_DIR, "readOnly": True}
_CATALOG_VOLUME: Doc = {"name": "catalog", "configMap": {"name": CATALOG_CONFIG_MAP}}


def _grpc_probe(period: int, failures: int) -> Doc:
    return {"grpc": {"port": WORKER_PORT}, "periodSeconds": period, "failureThreshold": failures}


def weights(entries: Iterable[ModelEntry], labels: dict[str, str]) -> tuple[list[Doc], list[Doc], list[Doc]]:
    """The models' weights in a pod: (init containers, volumes, the main container's mounts).

    Prepared models are converted into the `models` volume at /models/NAME by one init container each;
    `dir` models are the PersistentVolumeClaim's NAME, mounted at the same place.
    """
    entries = list(entries)
    init, volumes, mounts = [], [], []
    if any(e.weights.prepared for e in entries):
        volumes.append({"name": "models", "emptyDir": {}})
        mounts.append({"name": "models", "mountPath": MODELS_DIR, "readOnly": True})
    if any(not e.weights.prepared for e in entries):
        volumes.append({"name": "weights", "persistentVolumeClaim": {"claimName": WEIGHTS_CLAIM, "readOnly": True}})
    for entry in entries:
        if entry.weights.prepared:
            init.append({"name": f"prepare-{labels[entry.name]}", "image": "infermesh-cpu",
                         "args": ["prepare-model", entry.weights.prepared, "--dir", model_dir(entry)],
                         "volumeMounts": [{"name": "home", "mountPath": "/var/lib/infermesh"},
                                          {"name": "models", "mountPath": MODELS_DIR}],
                         "securityContext": _DROP_ALL})
        else:
            mounts.append({"name": "weights", "mountPath": model_dir(entry), "subPath": entry.name,
                           "readOnly": True})
    return init, volumes, mounts


def worker_documents(entry: ModelEntry, label: str) -> list[Doc]:
    """The model's worker Deployment (in the style of base's `worker`), its headless Service and its PDB."""
    selector = {COMPONENT_LABEL: "worker", MODEL_LABEL: label}
    name = worker_name(label)
    init, volumes, mounts = weights([entry], {entry.name: label})
    container = {
        "name": "worker",
        "image": "infermesh-cpu",
        "args": worker_args(entry),
        "env": [{"name": "INFERMESH_PORT", "value": str(WORKER_PORT)},
                {"name": "INFERMESH_METRICS_PORT", "value": str(WORKER_METRICS_PORT)},
                {"name": "INFERMESH_GRACE_PERIOD", "value": "60"},
                {"name": "INFERMESH_WORKER_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                _CATALOG_ENV],
        "ports": [{"name": "grpc", "containerPort": WORKER_PORT},
                  {"name": "metrics", "containerPort": WORKER_METRICS_PORT}],
        # The engine warms up for minutes: liveness waits for the startup probe.
        "startupProbe": _grpc_probe(5, 180),
        "readinessProbe": _grpc_probe(5, 2),
        "livenessProbe": _grpc_probe(10, 6),
        # The schedulers re-resolve the headless Service every 5 s; then SIGTERM drains what the pod runs.
        "lifecycle": {"preStop": {"sleep": {"seconds": 10}}},
        "resources": {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"memory": "12Gi"}},
        "volumeMounts": [{"name": "home", "mountPath": "/var/lib/infermesh"}, *mounts, _CATALOG_MOUNT,
                         {"name": "shm", "mountPath": "/dev/shm"}],
        "securityContext": _DROP_ALL,
    }
    pod: Doc = {
        # preStop (10 s) + the drain of in-flight streams (60 s) + margin.
        "terminationGracePeriodSeconds": 90,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001},
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": [{"name": "home", "emptyDir": {}}, *volumes, _CATALOG_VOLUME,
                    {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name, "labels": selector, "annotations": {MODEL_LABEL: entry.name}},
        "spec": {
            "replicas": entry.workers,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": selector,
                             "annotations": {MODEL_LABEL: entry.name, "prometheus.io/scrape": "true",
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
    """KEDA: the model's Deployment scaled on the requests waiting for that model (as base's `worker`)."""
    low, high = _bounds(entry, options)
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject",
        "metadata": {"name": worker_name(label), "labels": {COMPONENT_LABEL: "worker", MODEL_LABEL: label}},
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
        "metadata": {"name": worker_name(label), "labels": {COMPONENT_LABEL: "worker", MODEL_LABEL: label}},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": worker_name(label)},
            "minReplicas": low, "maxReplicas": high,
            "metrics": [{"type": "External", "external": {
                "metric": {"name": QUEUE_METRIC, "selector": {"matchLabels": {"model": entry.name}}},
                "target": {"type": "AverageValue", "averageValue": str(options.queue_threshold)}}}],
            "behavior": {"scaleDown": _SCALE_DOWN},
        },
    }


def service_patches(catalog: Catalog, labels: dict[str, str], served: Sequence[ModelEntry]) -> dict[str, Doc]:
    """Strategic-merge patches of base: the catalog in every service, the tokenizer loading every model, the
    schedulers watching every model's workers."""

    def patch(name: str, pod: Doc, container: Doc) -> Doc:
        container = {"name": name, **container}
        container["env"] = [*container.get("env", []), _CATALOG_ENV]
        container["volumeMounts"] = [*container.get("volumeMounts", []), _CATALOG_MOUNT]
        pod = {**pod, "containers": [container], "volumes": [*pod.get("volumes", []), _CATALOG_VOLUME]}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
                "spec": {"template": {"spec": pod}}}

    init, volumes, mounts = weights(catalog.models, labels)
    tokenizer_args = ["tokenizer"] + [a for e in catalog.models for a in ("--model", f"{e.name}={model_dir(e)}")]
    dns = ",".join(f"{workers_service(labels[e.name])}:{WORKER_PORT}" for e in served)
    return {
        # Base's tokenizer converts the default model; here every model of the catalog, into /models.
        "tokenizer": patch("tokenizer", {"initContainers": [{"name": "model", "$patch": "delete"}, *init],
                                         "volumes": volumes},
                           {"args": tokenizer_args, "volumeMounts": mounts}),
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


# --- the overlay -------------------------------------------------------------------------------------------------

def _yaml(docs: Sequence[Doc], comment: str = "") -> bytes:
    body = "---\n".join(yaml.safe_dump(d, sort_keys=False, default_flow_style=False, width=1000) for d in docs)
    return (HEADER + "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines()) + body).encode()


def _kustomization(resources: list[str], comment: str, **more: Any) -> bytes:
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
           "labels": [{"pairs": {"app.kubernetes.io/part-of": "infermesh"}}], "resources": resources, **more}
    return _yaml([doc], comment)


def render(catalog: Catalog, catalog_bytes: bytes, options: Options = Options()) -> dict[str, bytes]:
    """The overlay's files (relative path -> content) for `catalog`, read from `catalog_bytes`."""
    labels = model_labels(catalog)
    served = [e for e in catalog.models if e.workers > 0]
    base = options.base if _is_remote(options.base) else "../" + options.base  # mesh/ is one folder down
    patches = {**base_worker_deletions(), **service_patches(catalog, labels, served)}
    files = {
        "mesh/catalog.yaml": catalog_bytes,
        "mesh/kustomization.yaml": _kustomization(
            [base, "workers.yaml"],
            "Base and the catalog: the ConfigMap `catalog` (mounted into every service), a worker Deployment per\n"
            "model in place of base's `worker`, no worker autoscaling (replicas: each model's `workers`).\n"
            "  kubectl apply -k .   (the parent folder adds KEDA, ../hpa HPAs)",
            configMapGenerator=[{"name": CATALOG_CONFIG_MAP, "files": [CATALOG_FILE],
                                 # No hash in the name: an update reaches the mounted file, the services reload it.
                                 "options": {"disableNameSuffixHash": True}}],
            patches=[{"path": f"patches/{name}.yaml"} for name in patches],
            # As base's: `kustomize edit set image` here names the images of every tier.
            images=[{"name": image, "newName": image, "newTag": "latest"} for image in ("infermesh", "infermesh-cpu")]),
        "mesh/workers.yaml": _yaml([d for e in served for d in worker_documents(e, labels[e.name])],
                                   "Per model: its worker Deployment, the headless Service the schedulers find its "
                                   "workers by, a PDB."),
        **{f"mesh/patches/{n}.yaml": _yaml([p]) for n, p in patches.items()},
        "kustomization.yaml": _kustomization(
            ["mesh", "scaledobjects.yaml"],
            "The catalog's mesh, each model's workers scaled by KEDA on that model's queue depth.\n"
            "  kubectl apply -k .   (or ./hpa: HPAs instead of KEDA; ./mesh: no worker autoscaling)\n"
            "Needs KEDA and a Prometheus that scrapes the schedulers (prometheus.io/* annotations)."),
        "scaledobjects.yaml": _yaml([scaled_object(e, labels[e.name], options) for e in served]),
        "hpa/kustomization.yaml": _kustomization(
            ["../mesh", "hpas.yaml"],
            f"The catalog's mesh, each model's workers scaled by an HPA on the External metric {QUEUE_METRIC}\n"
            "{model=NAME}, instead of KEDA.   kubectl apply -k .\n"
            "Needs an external-metrics adapter serving it, e.g. prometheus-adapter with\n"
            f"  externalRules: [{{seriesQuery: {QUEUE_METRIC}, resources: {{namespaced: false}},\n"
            "                   metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>})'}]"),
        "hpa/hpas.yaml": _yaml([horizontal_pod_autoscaler(e, labels[e.name], options) for e in served
                                if is_label_value(e.name)]),
    }
    return files


def _is_remote(base: str) -> bool:
    return "://" in base or base.startswith(("github.com/", "git@"))


def without_hpa(catalog: Catalog) -> list[str]:
    """Models whose name is no label value, so that an HPA's selector cannot name them (KEDA can)."""
    return [e.name for e in catalog.models if e.workers > 0 and not is_label_value(e.name)]


def stale_files(files: dict[str, bytes], out: Path) -> list[str]:
    return [path for path, data in files.items() if not (out / path).is_file() or (out / path).read_bytes() != data]


def write(files: dict[str, bytes], out: Path) -> None:
    for path, data in files.items():
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="infermesh k8s-manifests",
        description="Render a catalog's Kubernetes overlay on deploy/k8s/base: the catalog as a ConfigMap, a worker "
                    "Deployment per model, KEDA ScaledObjects (or HPAs, in hpa/) on each model's queue depth.")
    parser.add_argument("--catalog", default=os.environ.get("INFERMESH_CATALOG") or None,
                        help="The catalog file [env INFERMESH_CATALOG].")
    parser.add_argument("--out", type=Path, help="The overlay's folder (default: print the files on stdout).")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if --out is not what the catalog "
                        "renders.")
    defaults = Options()
    parser.add_argument("--base", default=defaults.base, help="deploy/k8s/base, relative to --out (or a remote "
                        f"kustomize URL) [default {defaults.base}].")
    parser.add_argument("--prometheus", default=defaults.prometheus, help=f"KEDA's Prometheus [default "
                        f"{defaults.prometheus}].")
    parser.add_argument("--queue-threshold", type=int, default=defaults.queue_threshold,
                        help=f"Waiting requests per worker the autoscalers aim at [default "
                        f"{defaults.queue_threshold}].")
    parser.add_argument("--max-workers", type=int, default=defaults.max_workers,
                        help=f"Most workers per model the autoscalers start [default {defaults.max_workers}].")
    args = parser.parse_args(argv)
    if not args.catalog:
        parser.error("--catalog FILE is required")
    if args.check and args.out is None:
        parser.error("--check needs --out")
    if args.queue_threshold < 1 or args.max_workers < 1:
        parser.error("--queue-threshold and --max-workers are at least 1")
    base = args.base
    if Path(base).is_absolute():  # kustomize takes relative paths only
        base = os.path.relpath(base, args.out or Path.cwd())
    path = Path(args.catalog)
    try:
        data = path.read_bytes()
        catalog = parse_catalog(data, str(path), base_dir=path.resolve().parent)
        files = render(catalog, data, Options(base, args.prometheus, args.queue_threshold, args.max_workers))
    except OSError as exc:
        print(f"infermesh k8s-manifests: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except (CatalogError, RenderError) as exc:
        print(f"infermesh k8s-manifests: {exc}", file=sys.stderr)
        return 1
    for name in without_hpa(catalog):
        print(f"infermesh k8s-manifests: note: {name!r} is not a Kubernetes label value, so hpa/ has no HPA for it "
              "(KEDA's query has no such limit)", file=sys.stderr)
    if args.out is None:
        for name, data in files.items():
            sys.stdout.write(f"# ==> {name} <==\n{data.decode()}")
        return 0
    if args.check:
        stale = stale_files(files, args.out)
        if stale:
            print(f"infermesh k8s-manifests: out of date in {args.out} (render again): {', '.join(stale)}",
                  file=sys.stderr)
            return 1
        return 0
    write(files, args.out)
    print(f"wrote {len(files)} files to {args.out}: kubectl apply -k {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
