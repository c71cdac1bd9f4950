"""Write configs/grafana/collab-dashboard.json (Grafana dashboard schemaVersion 36, Grafana >= 10.1).

    python configs/grafana/make_dashboard.py

The JSON is generated so that panels stay consistent (one datasource variable, one layout); the
committed file must equal this script's output (tests/test_observability.py checks it, and that
every panel query returns data from a live run).
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).with_name("collab-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
W = "[1m]"


def q(expr: str, legend: str, ref: str = "A") -> dict:
    return {"expr": expr, "legendFormat": legend, "refId": ref, "datasource": DS}


def quantiles(metric: str, by: str, legend: str, scale: str = "") -> list[dict]:
    """p50/p95/p99 targets of a Prometheus histogram, grouped by `by`."""
    return [
        q(f"histogram_quantile({p / 100}, sum by (le, {by}) (rate({metric}_bucket{W}))){scale}", f"p{p} {legend}", ref)
        for p, ref in ((50, "A"), (95, "B"), (99, "C"))
    ]


# (title, description, unit, targets, panel type)
ROWS: list[tuple[str, list[tuple[str, str, str, list[dict], str]]]] = [
    (
        "Traffic",
        [
            (
                "Server requests/s by outcome",
                "Gateway replies per endpoint and outcome (answered at stage 1, need_roi, refined, errors).",
                "reqps",
                [q(f"sum by (endpoint, outcome) (rate(ray_collab_requests_total{W}))", "{{endpoint}} {{outcome}}")],
                "timeseries",
            ),
            (
                "Server errors/s",
                "4xx/5xx replies of the API (bad input, unknown/expired sessions, overload).",
                "reqps",
                [
                    q(
                        f'sum by (endpoint, outcome) (rate(ray_collab_requests_total{{outcome=~"error_.*"}}{W}))',
                        "{{endpoint}} {{outcome}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Edge queries/s by outcome",
                "Queries finished by the load-test agents (answered, refined, expired session, error).",
                "reqps",
                [q(f"sum by (policy, outcome) (rate(collab_edge_queries_total{W}))", "{{policy}} {{outcome}}")],
                "timeseries",
            ),
        ],
    ),
    (
        "Latency",
        [
            (
                "Stage latency p50/p95/p99",
                "Server time per stage: encode, first_pass, attention, roi_search, refine, and the gateway totals.",
                "ms",
                quantiles("ray_collab_stage_latency_ms", "stage", "{{stage}}"),
                "timeseries",
            ),
            (
                "End-to-end latency at the edge p50/p95/p99",
                "What an edge waits: total, simulated network, server.",
                "s",
                quantiles("collab_edge_latency_seconds", "part", "{{part}}"),
                "timeseries",
            ),
            (
                "Serve processing latency p95 per deployment",
                "Ray Serve's own per-replica processing time.",
                "ms",
                [
                    q(
                        "histogram_quantile(0.95, sum by (le, deployment) "
                        f"(rate(ray_serve_deployment_processing_latency_ms_bucket{W})))",
                        "{{deployment}}",
                    )
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Gate and RoI",
        [
            (
                "Refine rate",
                "Fraction of first passes whose gate asked the edge for a crop, per policy.",
                "percentunit",
                [
                    q(
                        f'sum by (policy) (rate(ray_collab_gate_decisions_total{{decision="refine"}}{W})) / sum by '
                        f"(policy) (rate(ray_collab_gate_decisions_total{W}))",
                        "{{policy}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Entropy threshold",
                "Threshold (bits) of the latest entropy-gated request.",
                "none",
                [q("max by (policy) (ray_collab_gate_threshold_bits)", "{{policy}}")],
                "stat",
            ),
            (
                "First-pass score distribution",
                "Uncertainty (bits) of first-pass answers; the gate refines above the threshold.",
                "none",
                [{**q(f"sum by (le) (increase(ray_collab_gate_score_bits_bucket{W}))", "{{le}}"), "format": "heatmap"}],
                "heatmap",
            ),
            (
                "RoI area fraction p50/p90",
                "Area of the requested crop over the original image: what a refine costs the edge.",
                "percentunit",
                [
                    q(
                        f"histogram_quantile({p}, sum by (le) (rate(ray_collab_roi_area_fraction_bucket{W})))",
                        f"p{int(p * 100)}",
                        ref,
                    )
                    for p, ref in ((0.5, "A"), (0.9, "B"))
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Bytes and accuracy",
        [
            (
                "Uplink bytes per query per stage (server)",
                "Image bytes received per answered query, global and local.",
                "bytes",
                [
                    q(
                        f"sum by (stage) (rate(ray_collab_uplink_bytes_total{W})) / "
                        f'scalar(sum(rate(ray_collab_requests_total{{endpoint="query", outcome!~"error_.*"}}{W})))',
                        "{{stage}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Uplink bytes per query (edge)",
                "Mean bytes an edge sent per query, per policy, and the split per stage (bytes/s).",
                "bytes",
                [
                    q(
                        f"sum by (policy) (rate(collab_edge_query_bytes_sum{W})) / sum by (policy) "
                        f"(rate(collab_edge_query_bytes_count{W}))",
                        "mean {{policy}}",
                    ),
                    q(
                        f"sum by (policy, stage) (rate(collab_edge_uplink_bytes_total{W}))",
                        "{{policy}} {{stage}} bytes/s",
                        "B",
                    ),
                ],
                "timeseries",
            ),
            (
                "Accuracy (edge, ground truth known)",
                "VQA accuracy of answered queries, per policy.",
                "percentunit",
                [
                    q(
                        "sum by (policy) (rate(collab_edge_correct_total[5m])) / sum by (policy) "
                        "(rate(collab_edge_graded_total[5m]))",
                        "{{policy}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Edge retries/s",
                "HTTP attempts retried by the agents (transient failures).",
                "reqps",
                [q(f"sum by (policy) (rate(collab_edge_retries_total{W}))", "{{policy}}")],
                "timeseries",
            ),
            (
                "Shared uplink",
                "Utilisation and transfers in flight of the simulated shared channel.",
                "none",
                [
                    q("max(collab_edge_channel_utilisation)", "utilisation"),
                    q("max(collab_edge_channel_in_flight)", "transfers in flight", "B"),
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Serve",
        [
            (
                "Replicas per deployment",
                "Healthy replicas, and the autoscaler's target.",
                "none",
                [
                    q("sum by (deployment) (ray_serve_deployment_replica_healthy)", "{{deployment}}"),
                    q("max by (deployment) (ray_serve_autoscaling_target_replicas)", "target {{deployment}}", "B"),
                ],
                "timeseries",
            ),
            (
                "Queue lengths",
                "Requests queued at the handles and being processed by replicas, per deployment.",
                "none",
                [
                    q("sum by (deployment) (ray_serve_deployment_queued_queries)", "queued {{deployment}}"),
                    q("sum by (deployment) (ray_serve_replica_processing_queries)", "processing {{deployment}}", "B"),
                ],
                "timeseries",
            ),
            (
                "Batch size",
                "Requests per model pass (`@serve.batch`): images per vision-tower pass, queries per first-pass "
                "and refined decode.",
                "none",
                [
                    q(
                        f"sum by (deployment) (rate(ray_serve_actual_batch_size_sum{W})) / sum by (deployment) "
                        f"(rate(ray_serve_actual_batch_size_count{W}))",
                        "mean {{deployment}}",
                    )
                ],
                "timeseries",
            ),
            (
                "Session store",
                "Sessions waiting for a refine, their feature memory, and lifecycle events/s.",
                "none",
                [
                    q("sum(ray_collab_sessions_active)", "active sessions"),
                    q("sum(ray_collab_session_bytes)", "feature bytes", "B"),
                    q(f"sum by (event) (rate(ray_collab_session_events_total{W}))", "{{event}}/s", "C"),
                ],
                "timeseries",
            ),
        ],
    ),
    (
        "Adaptive gate",
        [
            (
                "Adaptive refine-rate cap",
                "The cap each gateway replica's load controller puts on the refine rate (1 = the static gate's "
                "rate applies; lower when the server's p95 passed gate.adaptive.slo_p95_ms).",
                "percentunit",
                [q("max by (replica) (ray_collab_adaptive_refine_cap)", "{{replica}}")],
                "timeseries",
            ),
            (
                "Adaptive controller signals",
                "Each controller's last window signal (p95 server time of its window's queries, or the age of its "
                "oldest request in flight, the larger) and the backlog a new request would wait behind (requests "
                "ahead / recent completion rate: crops are refused while it leaves no time for a refine), against "
                "gate.adaptive.slo_p95_ms.",
                "ms",
                [
                    q("max by (replica) (ray_collab_adaptive_p95_ms)", "p95 {{replica}}"),
                    q("max by (replica) (ray_collab_adaptive_backlog_ms)", "backlog {{replica}}", "B"),
                ],
                "timeseries",
            ),
            (
                "Threshold in force by replica",
                "The entropy threshold of each gateway replica's latest gated request (adaptive: raised under load).",
                "none",
                [q("max by (replica, policy) (ray_collab_gate_threshold_bits)", "{{replica}} {{policy}}")],
                "timeseries",
            ),
        ],
    ),
]


def panel(
    pid: int, title: str, description: str, unit: str, targets: list[dict], kind: str, x: int, y: int, w: int
) -> dict:
    out = {
        "id": pid,
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": w, "x": x, "y": y},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
    }
    if kind == "timeseries":
        out["options"] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "none"},
        }
    return out


def build() -> dict:
    panels, pid, y = [], 1, 0
    for row_title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": row_title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y = pid + 1, y + 1
        w = 24 // min(len(row), 3)
        for i, spec in enumerate(row):
            x = (i % 3) * w
            if i and i % 3 == 0:
                y += 8
            panels.append(panel(pid, *spec, x=x, y=y, w=w))
            pid += 1
        y += 8
    return {
        "title": "collab-vlm",
        "uid": "collab-vlm",
        "description": "Edge-server collaborative VLM inference: traffic, latency, gate, bytes, accuracy, Serve.",
        "tags": ["collab-vlm", "ray-serve"],
        "timezone": "browser",
        "editable": True,
        "schemaVersion": 36,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-30m", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"text": "Prometheus", "value": "prometheus"},
                    "hide": 0,
                }
            ]
        },
        "panels": panels,
    }


def main() -> None:
    OUT.write_text(json.dumps(build(), indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
