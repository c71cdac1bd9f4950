"""Edge-side Prometheus metrics, exported by the load-test driver (prometheus-client).

The driver observes every query row as it streams in from the agents, so the exporter lives in
one process on one port, whatever the number of agent actors. Names start with `collab_edge_`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
BYTES_BUCKETS = (1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 64_000, 128_000, 256_000)


class EdgeMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.queries = Counter(
            "collab_edge_queries", "Queries finished by the edge agents", ["policy", "profile", "outcome"], registry=r
        )
        self.latency = Histogram(
            "collab_edge_latency_seconds",
            "End-to-end query latency at the edge",
            ["policy", "part"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.bytes = Counter(
            "collab_edge_uplink_bytes", "Uplink payload bytes sent, per stage", ["policy", "stage"], registry=r
        )
        self.bytes_per_query = Histogram(
            "collab_edge_query_bytes",
            "Uplink bytes per query (both stages)",
            ["policy"],
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.correct = Counter(
            "collab_edge_correct", "Sum of VQA accuracy of answered queries with ground truth", ["policy"], registry=r
        )
        self.graded = Counter("collab_edge_graded", "Answered queries with ground truth", ["policy"], registry=r)
        self.retries = Counter("collab_edge_retries", "Retried HTTP attempts", ["policy"], registry=r)
        self.channel_utilisation = Gauge(
            "collab_edge_channel_utilisation", "Busy fraction of the shared uplink", registry=r
        )
        self.channel_in_flight = Gauge("collab_edge_channel_in_flight", "Transfers on the shared uplink", registry=r)

    @classmethod
    def serve(cls, port: int, addr: str = "127.0.0.1") -> EdgeMetrics:
        metrics = cls()
        start_http_server(port, addr=addr, registry=metrics.registry)
        return metrics

    def observe(self, row: dict) -> None:
        policy = row["policy"]
        if row["error"]:
            outcome = "error"
        elif row["session_expired"]:
            outcome = "expired"
        else:
            outcome = "refined" if row["stage"] == 2 else "answered"
        self.queries.labels(policy, row["profile"], outcome).inc()
        self.retries.labels(policy).inc(row["retries"])
        if row["error"]:
            return
        for part, key in (("total", "latency_ms"), ("network", "network_ms"), ("server", "server_ms")):
            self.latency.labels(policy, part).observe(row[key] / 1000)
        self.bytes.labels(policy, "global").inc(row["global_bytes"])
        self.bytes.labels(policy, "local").inc(row["local_bytes"])
        self.bytes_per_query.labels(policy).observe(row["global_bytes"] + row["local_bytes"])
        if row["correct"] is not None:
            self.correct.labels(policy).inc(row["correct"])
            self.graded.labels(policy).inc()

    def channel(self, stats: dict) -> None:
        self.channel_utilisation.set(stats["utilisation"])
        self.channel_in_flight.set(stats["in_flight"])
