"""Prometheus exposition shared by the services: `--metrics-port` serves /metrics (0 turns it off).

Metrics that vLLM also has carry vLLM's name after the `fastserve:` prefix
(`fastserve:kv_cache_usage_perc`, `fastserve:time_to_first_token_seconds`, ...); every
metric has vLLM's `model_name` label, set once per process with `set_model_name`, so
the code that updates a metric never names the model.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("fastserve.metrics")
PREFIX = "fastserve:"
_model_name = [""]


def set_model_name(name: str) -> None:
    _model_name[0] = name


class ModelLabeled:
    """A metric whose first label is `model_name`: `.inc()`, `.set()`, `.observe()` and
    `.labels(*others)` work as on a metric without it.

    Children are cached per label values: prometheus_client's own `labels()` takes a lock
    and validates its arguments, which the scheduler would otherwise pay on every iteration."""

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        key = (_model_name[0], *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.metric.labels(*key)
        return child

    def __getattr__(self, name: str) -> Any:
        return getattr(self.labels(), name)


def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> ModelLabeled:
    return ModelLabeled(Counter(PREFIX + name, doc, ["model_name", *labels]))


def gauge(name: str, doc: str, labels: tuple[str, ...] = ()) -> ModelLabeled:
    return ModelLabeled(Gauge(PREFIX + name, doc, ["model_name", *labels]))


def histogram(name: str, doc: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> ModelLabeled:
    return ModelLabeled(Histogram(PREFIX + name, doc, ["model_name", *labels], buckets=buckets))


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
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)  # tokens per request


def serve_metrics(host: str, port: int) -> None:
    if port <= 0:
        log.info("metrics off (--metrics-port 0)")
        return
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
