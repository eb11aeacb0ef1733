"""Prometheus exposition shared by the services: `--metrics-port` serves /metrics (0 turns it off)."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

log = logging.getLogger("fastserve.metrics")

# Buckets for per-token and per-request latencies (seconds), in the spirit of vLLM's.
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
)
REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


def serve_metrics(host: str, port: int) -> None:
    if port <= 0:
        log.info("metrics off (--metrics-port 0)")
        return
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
