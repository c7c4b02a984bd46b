"""Writes infermesh-dashboard.json, the Grafana dashboard over the mesh's metrics.

    python deploy/grafana/dashboard.py          # rewrite the JSON next to this file
    python deploy/grafana/dashboard.py --check  # exit 1 when the JSON is stale

Rows: the edge (Envoy) and the frontends, the scheduler, the workers (vLLM's
own metric names, so dashboards written for `vllm serve` read them too), the
tokenizer. Every query's metric exists in a running mesh (a test scrapes one
with a real Prometheus and checks).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "[$__rate_interval]"
OUT = Path(__file__).with_name("infermesh-dashboard.json")


def quantiles(metric: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.95, 0.99)) -> list[tuple[str, str]]:
    group = f"le{', ' + by if by else ''}"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{RATE})))", f"p{int(q * 100)}{suffix}")
            for q in qs]


# (row title, [(panel title, unit, [(expr, legend)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Edge and frontends", [
        ("Edge requests/s by status class", "reqps", [
            (f'sum by (envoy_response_code_class) (rate(envoy_http_downstream_rq_xx'
             f'{{envoy_http_conn_manager_prefix="edge"}}{RATE}))', "{{envoy_response_code_class}}xx")]),
        ("Healthy frontends (Envoy's view)", "short", [
            ('sum by (envoy_cluster_name) (envoy_cluster_membership_healthy'
             '{envoy_cluster_name=~"frontend_.*"})', "{{envoy_cluster_name}}")]),
        ("Envoy retries and connect failures/s", "reqps", [
            (f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_rq_retry{RATE}))",
             "retry {{envoy_cluster_name}}"),
            (f"sum by (envoy_cluster_name) (rate(envoy_cluster_upstream_cx_connect_fail{RATE}))",
             "connect fail {{envoy_cluster_name}}")]),
        ("HTTP requests/s by route and code", "reqps", [
            (f"sum by (route, code) (rate(infermesh_http_requests_total{RATE}))", "{{route}} {{code}}")]),
        ("gRPC requests/s by method and code", "reqps", [
            (f"sum by (method, code) (rate(infermesh_frontend_grpc_requests_total{RATE}))", "{{method}} {{code}}")]),
        ("Active streams", "short", [("sum by (api) (infermesh_active_streams)", "{{api}}")]),
        ("Time to first token (client side)", "s", quantiles("infermesh_time_to_first_token_seconds")),
        ("Inter-token latency (client side)", "s", quantiles("infermesh_inter_token_latency_seconds")),
        ("End-to-end latency", "s", quantiles("infermesh_e2e_request_latency_seconds")),
        ("Tokens/s", "short", [
            (f"sum(rate(infermesh_prompt_tokens_total{RATE}))", "prompt"),
            (f"sum(rate(infermesh_generation_tokens_total{RATE}))", "generated")]),
        ("Worker calls retried or migrated/s", "reqps", [
            (f"sum by (reason) (rate(infermesh_frontend_worker_retries_total{RATE}))", "{{reason}}")]),
    ]),
    ("Scheduler", [
        ("Queue depth", "short", [
            ("sum by (model, priority) (infermesh_scheduler_queue_depth)", "{{model}} {{priority}}")]),
        ("Admitted and rejected/s", "reqps", [
            (f"sum by (model) (rate(infermesh_scheduler_admitted_total{RATE}))", "admitted {{model}}"),
            (f"sum by (reason) (rate(infermesh_scheduler_rejected_total{RATE}))", "rejected: {{reason}}")]),
        ("Queue time", "s", quantiles("infermesh_scheduler_queue_time_seconds")),
        ("Routing decisions/s", "reqps", [
            (f"sum by (policy, outcome) (rate(infermesh_scheduler_routing_decisions_total{RATE}))",
             "{{policy}} {{outcome}}")]),
        ("Leases ended/s", "reqps", [
            (f"sum by (how) (rate(infermesh_scheduler_leases_ended_total{RATE}))", "{{how}}")]),
        ("Worker state (0 connecting, 1 ready, 2 draining, 3 unreachable)", "short", [
            ("max by (worker) (infermesh_scheduler_worker_state)", "{{worker}}")]),
        ("Free sequences and pending leases per worker", "short", [
            ("min by (worker) (infermesh_scheduler_worker_free_seqs)", "free {{worker}}"),
            ("max by (worker) (infermesh_scheduler_worker_pending_leases)", "pending {{worker}}")]),
        ("KV cache per worker (scheduler's view)", "percentunit", [
            ("max by (worker) (infermesh_scheduler_worker_kv_cache_usage)", "{{worker}}")]),
    ]),
    ("Workers (vLLM metrics)", [
        ("Running and waiting sequences", "short", [
            ("sum by (instance) (vllm:num_requests_running)", "running {{instance}}"),
            ("sum by (instance) (vllm:num_requests_waiting)", "waiting {{instance}}")]),
        ("KV cache usage", "percentunit", [("max by (instance) (vllm:kv_cache_usage_perc)", "{{instance}}")]),
        ("Generation tokens/s", "short", [
            (f"sum by (instance) (rate(vllm:generation_tokens_total{RATE}))", "{{instance}}")]),
        ("Prompt tokens/s", "short", [
            (f"sum by (instance) (rate(vllm:prompt_tokens_total{RATE}))", "{{instance}}")]),
        ("Time to first token (engine)", "s", quantiles("vllm:time_to_first_token_seconds")),
        ("Inter-token latency (engine)", "s", quantiles("vllm:inter_token_latency_seconds")),
        ("End-to-end latency (engine)", "s", quantiles("vllm:e2e_request_latency_seconds")),
        ("Finished requests/s", "reqps", [
            (f"sum by (finished_reason) (rate(vllm:request_success_total{RATE}))", "{{finished_reason}}")]),
        ("Prefix cache hit rate", "percentunit", [
            ("max by (instance) (infermesh_worker_prefix_cache_hit_rate)", "{{instance}}")]),
        ("Refused calls/s", "reqps", [
            (f"sum by (code) (rate(infermesh_worker_refused_total{RATE}))", "{{code}}")]),
    ]),
    ("Tokenizer", [
        ("Calls/s by method and code", "reqps", [
            (f"sum by (method, code) (rate(infermesh_tokenizer_requests_total{RATE}))", "{{method}} {{code}}")]),
        ("Call latency p95", "s", quantiles("infermesh_tokenizer_request_seconds", "method", (0.95,))),
        ("Prompt tokens rendered/s", "short", [
            (f"sum by (model) (rate(infermesh_tokenizer_tokens_total{RATE}))", "{{model}}")]),
    ]),
]


def panel(panel_id: int, title: str, unit: str, targets: list[tuple[str, str]], x: int, y: int) -> dict[str, Any]:
    return {
        "id": panel_id, "type": "timeseries", "title": title, "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": unit, "custom": {"lineWidth": 1, "fillOpacity": 10}}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}},
        "targets": [{"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
                    for i, (expr, legend) in enumerate(targets)],
    }


def build() -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    next_id, y = 1, 0
    for title, row in ROWS:
        panels.append({"id": next_id, "type": "row", "title": title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        next_id, y = next_id + 1, y + 1
        for i, (panel_title, unit, targets) in enumerate(row):
            panels.append(panel(next_id, panel_title, unit, targets, (i % 3) * 8, y + (i // 3) * 8))
            next_id += 1
        y += ((len(row) + 2) // 3) * 8
    return {
        "uid": "infermesh", "title": "infermesh", "tags": ["infermesh", "vllm"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "editable": True, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus",
                                 "label": "Prometheus", "current": {}, "hide": 0}]},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.is_file() or OUT.read_text() != text:
            print(f"{OUT.name} is stale: run python deploy/grafana/dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
