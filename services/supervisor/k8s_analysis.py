"""Argo Rollouts AnalysisTemplates of a canary version, from the catalog's rollback rule.

The scheduler rolls a canary back by itself when it breaches its model's `rollback` rule (docs/catalog.md);
for operators who prefer rollouts run by the cluster, the same rule as Argo Rollouts AnalysisTemplates
(argoproj.io/v1alpha1) on the scheduler's version metrics:

- `infermesh-canary`: the catalog's default rule (`Rollback()`), for any model; args `model` (the model's
  name, `chat`), `version` (the canary's, `v2`), `stable-version` and `prometheus` (its address).
- `infermesh-canary-LABEL` per versioned model: that model's own rule, `model` and `stable-version` given.

Each metric is measured every `window_s` seconds over the last `window_s` seconds, summed over the
schedulers:

- `error-rate`: the canary's requests whose outcome is not `ok`, over all its requests; it passes at most
  `max_error_rate`, or when the stable version's error rate is as high (the canary is not the cause);
- `ttft-ratio`, `tpot-ratio`: the canary's p95 time to first token (time per output token) over the stable
  version's; passes at most `max_ttft_ratio` (`max_tpot_ratio`).

A measurement over fewer than `min_requests` requests (the canary's; for a ratio, the stable version's too)
is an empty result and passes: as in the scheduler, nothing is decided on too few requests. `failureLimit`
is 0, so the first failed measurement fails the analysis (the scheduler too rolls back at once); there is no
`count`: the analysis runs until it is stopped (a Rollout's background analysis).
"""

from __future__ import annotations

from infermesh.common.catalog import ModelEntry, Rollback
from infermesh.supervisor.k8s_documents import COMPONENT_LABEL, MODEL_LABEL, Doc, Options, dns_label

API_VERSION, KIND = "argoproj.io/v1alpha1", "AnalysisTemplate"
TEMPLATE = "infermesh-canary"
# The scheduler's version metrics (labels model, version: the model's name and the version's).
VERSION_REQUESTS = "infermesh_scheduler_version_requests_total"  # and outcome: ok, failed, timeout, worker_lost
VERSION_TTFT = "infermesh_scheduler_version_ttft_seconds"  # histograms
VERSION_TPOT = "infermesh_scheduler_version_tpot_seconds"
QUANTILE = 0.95


def arg(name: str) -> str:
    """An Argo argument's placeholder, `{{args.NAME}}`."""
    return "{{args." + name + "}}"


def duration(seconds: float) -> str:
    """Seconds as a duration both PromQL ranges and Argo's intervals read: `60s`, `1500ms`."""
    return f"{seconds:.0f}s" if seconds == int(seconds) else f"{round(seconds * 1000)}ms"


def _series(metric: str, version: str, more: str = "") -> str:
    return metric + "{" + f'model="{arg("model")}",version="{arg(version)}"{more}' + "}"


def _requests(version: str, window: str, more: str = "") -> str:
    return f"sum(increase({_series(VERSION_REQUESTS, version, more)}[{window}]))"


def error_rate_query(rule: Rollback) -> str:
    """The canary's error rate when it has enough requests and is above the stable version's (or the stable
    version has none), else nothing."""
    window, failed = duration(rule.window_s), ',outcome!="ok"'
    return (f"(\n"
            f"  {_requests('version', window, failed)}\n"
            f"    / {_requests('version', window)}\n"
            f"  > (\n"
            f"    {_requests('stable-version', window, failed)}\n"
            f"      / ({_requests('stable-version', window)} > 0)\n"
            f"    or vector(0)\n"
            f"  )\n"
            f")\n"
            f"and {_requests('version', window)} >= {rule.min_requests}\n")


def ratio_query(histogram: str, rule: Rollback) -> str:
    """The canary's p95 of `histogram` over the stable version's, when both have enough requests."""
    window = duration(rule.window_s)

    def p95(version: str) -> str:
        return f"histogram_quantile({QUANTILE:g}, sum by (le) (rate({_series(histogram + '_bucket', version)}" \
               f"[{window}])))"

    return (f"(\n"
            f"  {p95('version')}\n"
            f"    / {p95('stable-version')}\n"
            f")\n"
            f"and {_requests('version', window)} >= {rule.min_requests}\n"
            f"and {_requests('stable-version', window)} >= {rule.min_requests}\n")


def _metric(name: str, query: str, most: float, rule: Rollback) -> Doc:
    return {"name": name, "interval": duration(rule.window_s), "failureLimit": 0,
            "successCondition": f"len(result) == 0 || result[0] <= {most:g}",
            "provider": {"prometheus": {"address": arg("prometheus"), "query": query}}}


def analysis_template(options: Options, model: ModelEntry | None = None) -> Doc:
    """The AnalysisTemplate of `model`'s canaries (its own rule, its name and stable version given), or,
    without a model, the generic one with the catalog's default rule."""
    rule = model.rollback if model is not None else Rollback()
    name = f"{TEMPLATE}-{dns_label(model.name)}" if model is not None else TEMPLATE
    labels = {COMPONENT_LABEL: "canary-analysis", **({MODEL_LABEL: dns_label(model.name)} if model else {})}
    given = {"model": model.name, "stable-version": model.stable} if model is not None else {}
    return {
        "apiVersion": API_VERSION, "kind": KIND,
        "metadata": {"name": name, "labels": labels,
                     **({"annotations": {MODEL_LABEL: model.name}} if model is not None else {})},
        "spec": {
            "args": [{"name": n, **({"value": given[n]} if n in given else {})}
                     for n in ("model", "version", "stable-version")] +
                    [{"name": "prometheus", "value": options.prometheus}],
            "metrics": [_metric("error-rate", error_rate_query(rule), rule.max_error_rate, rule),
                        _metric("ttft-ratio", ratio_query(VERSION_TTFT, rule), rule.max_ttft_ratio, rule),
                        _metric("tpot-ratio", ratio_query(VERSION_TPOT, rule), rule.max_tpot_ratio, rule)],
        },
    }


def analysis_templates(models: tuple[ModelEntry, ...], options: Options) -> list[Doc]:
    """The generic template, then one per versioned model of `models`."""
    return [analysis_template(options), *(analysis_template(options, m) for m in models if m.versions)]
