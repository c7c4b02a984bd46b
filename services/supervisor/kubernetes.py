"""`infermesh k8s-manifests`: a catalog's Kubernetes overlay, rendered from the catalog alone.

On Kubernetes the catalog stays the single source of truth: this module turns
it into a kustomize overlay on `deploy/k8s/base`, and nothing in the overlay is
written by hand (`deploy/k8s/overlays/catalog-demo/` is the demo catalog's, and
a test checks it is what this renders now). The overlay, in `--out DIR`:

    DIR/kustomization.yaml       the mesh, workers scaled by KEDA:     kubectl apply -k DIR
    DIR/scaledobjects.yaml       per served model, a ScaledObject on its own queue depth
    DIR/hpa/kustomization.yaml   the mesh, workers scaled by HPAs:     kubectl apply -k DIR/hpa
    DIR/hpa/hpas.yaml            per served model, an HPA on the External metric of the same series
    DIR/mesh/kustomization.yaml  base and the catalog, fixed replicas: kubectl apply -k DIR/mesh
    DIR/mesh/catalog.yaml        the catalog file, byte for byte (the ConfigMap `catalog`)
    DIR/mesh/workers.yaml        per served model, a worker Deployment, its headless Service and a PDB
    DIR/mesh/patches/*.yaml      base's single worker removed; the catalog mounted into every service
    DIR/rollouts/                Argo Rollouts AnalysisTemplates of canary versions: kubectl apply -k DIR/rollouts

A served model is a model, or one version of a versioned model (`chat@v2`):
each gets its own worker Deployment and autoscaler (`k8s_documents`).

- The ConfigMap `catalog` holds the file itself and is mounted (as a directory,
  so that an update reaches the pods and the services reload it) at
  `/etc/infermesh/catalog/`, with `INFERMESH_CATALOG` naming the file, in the
  tokenizer, the scheduler, the frontend and every worker. Its name carries no
  hash: changing the catalog does not restart the pods.
- Weights: a `prepared` model is converted into the pod's `models` volume by
  an init container (`prepare-model NAME --dir /models/NAME`), as base does
  for the default model; a `dir` model is read from the PersistentVolumeClaim
  `infermesh-models` (which the operator provides) at the model's name.
- The schedulers find each served model's workers through its headless Service
  `worker-LABEL-pods` (`INFERMESH_WORKERS_DNS` lists them all).
- Autoscaling, one of two: KEDA on `sum(infermesh_scheduler_queue_depth{model="NAME"})`,
  or an `autoscaling/v2` HPA on the External metric `infermesh_scheduler_queue_depth`
  with the selector `model=NAME` (served by an adapter such as prometheus-adapter;
  a NAME that is no label value, as every version's `chat@v2`, gets no HPA).
  Both scale between the served model's `workers` and `--max-workers`.
- The AnalysisTemplates (`k8s_analysis`) are a kustomization of their own: they
  need Argo Rollouts' CRDs, which the mesh does not.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from infermesh.common.catalog import Catalog, CatalogError, parse_catalog
from infermesh.supervisor.k8s_analysis import analysis_templates
from infermesh.supervisor.k8s_documents import (
    CATALOG_CONFIG_MAP,
    CATALOG_FILE,
    NAMESPACE,
    QUEUE_METRIC,
    Doc,
    Options,
    RenderError,
    base_worker_deletions,
    horizontal_pod_autoscaler,
    is_label_value,
    scaled_object,
    served_labels,
    service_patches,
    worker_documents,
)

HEADER = ("# Rendered by `infermesh k8s-manifests` from the catalog (mesh/catalog.yaml is its copy): change the\n"
          "# catalog and render again (docs/catalog.md, \"On Kubernetes\") rather than editing this file.\n")


# --- the overlay -------------------------------------------------------------------------------------------------

class _Dumper(yaml.SafeDumper):
    """Text of several lines (a PromQL query) as a literal block."""


def _text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _text)


def _yaml(docs: Sequence[Doc], comment: str = "") -> bytes:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1000)
                        for d in docs)
    return (HEADER + "".join(f"# {line}\n".replace("# \n", "#\n") for line in comment.splitlines()) + body).encode()


def _kustomization(resources: list[str], comment: str, **more: Any) -> bytes:
    doc = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": NAMESPACE,
           "labels": [{"pairs": {"app.kubernetes.io/part-of": "infermesh"}}], "resources": resources, **more}
    return _yaml([doc], comment)


def render(catalog: Catalog, catalog_bytes: bytes, options: Options | None = None) -> dict[str, bytes]:
    """The overlay's files (relative path -> content) for `catalog`, read from `catalog_bytes` (with base's
    defaults for the options not given)."""
    options = options or Options()
    labels = served_labels(catalog)
    with_workers = [e for e in catalog.served_models() if e.workers > 0]
    base = options.base if _is_remote(options.base) else "../" + options.base  # mesh/ is one folder down
    patches = {**base_worker_deletions(), **service_patches(catalog, labels, with_workers)}
    files = {
        "mesh/catalog.yaml": catalog_bytes,
        "mesh/kustomization.yaml": _kustomization(
            [base, "workers.yaml"],
            "Base and the catalog: the ConfigMap `catalog` (mounted into every service), a worker Deployment per\n"
            "model (each version of a versioned model) in place of base's `worker`, no worker autoscaling\n"
            "(replicas: each one's `workers`).\n"
            "  kubectl apply -k .   (the parent folder adds KEDA, ../hpa HPAs)",
            configMapGenerator=[{"name": CATALOG_CONFIG_MAP, "files": [CATALOG_FILE],
                                 # No hash in the name: an update reaches the mounted file, the services reload it.
                                 "options": {"disableNameSuffixHash": True}}],
            patches=[{"path": f"patches/{name}.yaml"} for name in patches],
            # As base's: `kustomize edit set image` here names the images of every tier.
            images=[{"name": image, "newName": image, "newTag": "latest"} for image in ("infermesh", "infermesh-cpu")]),
        "mesh/workers.yaml": _yaml([d for e in with_workers for d in worker_documents(e, labels[e.name])],
                                   "Per model (each version of a versioned model): its worker Deployment, the "
                                   "headless Service the\nschedulers find its workers by, a PDB."),
        **{f"mesh/patches/{n}.yaml": _yaml([p]) for n, p in patches.items()},
        "kustomization.yaml": _kustomization(
            ["mesh", "scaledobjects.yaml"],
            "The catalog's mesh, each model's (each version's) workers scaled by KEDA on its own queue depth.\n"
            "  kubectl apply -k .   (or ./hpa: HPAs instead of KEDA; ./mesh: no worker autoscaling)\n"
            "Needs KEDA and a Prometheus that scrapes the schedulers (prometheus.io/* annotations)."),
        "scaledobjects.yaml": _yaml([scaled_object(e, labels[e.name], options) for e in with_workers]),
        "hpa/kustomization.yaml": _kustomization(
            ["../mesh", "hpas.yaml"],
            f"The catalog's mesh, each model's workers scaled by an HPA on the External metric {QUEUE_METRIC}\n"
            "{model=NAME}, instead of KEDA.   kubectl apply -k .\n"
            "Needs an external-metrics adapter serving it, e.g. prometheus-adapter with\n"
            f"  externalRules: [{{seriesQuery: {QUEUE_METRIC}, resources: {{namespaced: false}},\n"
            "                   metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>})'}]\n"
            "A NAME that is no label value (every version's, `chat@v2`) has no HPA: its replicas stay `workers`."),
        "hpa/hpas.yaml": _yaml([horizontal_pod_autoscaler(e, labels[e.name], options) for e in with_workers
                                if is_label_value(e.name)]),
        "rollouts/kustomization.yaml": _kustomization(
            ["analysistemplates.yaml"],
            "Argo Rollouts AnalysisTemplates of canary versions (the catalog's rollback rule, on the schedulers'\n"
            "version metrics), for rollouts run by the cluster.   kubectl apply -k .\n"
            "Needs Argo Rollouts (its CRDs) and a Prometheus that scrapes the schedulers."),
        "rollouts/analysistemplates.yaml": _yaml(
            analysis_templates(catalog.models, options),
            "infermesh-canary: the catalog's default rule, for any model (args model, version, stable-version);\n"
            "infermesh-canary-LABEL: a versioned model's own rule, its name and stable version given."),
    }
    return files


def _is_remote(base: str) -> bool:
    return "://" in base or base.startswith(("github.com/", "git@"))


def without_hpa(catalog: Catalog) -> list[str]:
    """Served models whose name is no label value (every version's), so that an HPA's selector cannot name
    them (KEDA can)."""
    return [e.name for e in catalog.served_models() if e.workers > 0 and not is_label_value(e.name)]


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
                    "Deployment per model (per version of a versioned model), KEDA ScaledObjects (or HPAs, in hpa/) "
                    "on each one's queue depth, Argo Rollouts AnalysisTemplates (in rollouts/).")
    parser.add_argument("--catalog", default=os.environ.get("INFERMESH_CATALOG") or None,
                        help="The catalog file [env INFERMESH_CATALOG].")
    parser.add_argument("--out", type=Path, help="The overlay's folder (default: print the files on stdout).")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 if --out is not what the catalog "
                        "renders.")
    defaults = Options()
    parser.add_argument("--base", default=defaults.base, help="deploy/k8s/base, relative to --out (or a remote "
                        f"kustomize URL) [default {defaults.base}].")
    parser.add_argument("--prometheus", default=defaults.prometheus,
                        help=f"KEDA's and the AnalysisTemplates' Prometheus [default {defaults.prometheus}].")
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
