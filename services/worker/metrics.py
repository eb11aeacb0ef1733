"""A worker's Prometheus metrics (FastServe's own): the KV pools it holds and how long loading took.

Per-iteration times are measured by the scheduler from the workers' replies
(`fastserve:worker_compute_seconds` on the scheduler's /metrics).
"""

from prometheus_client import Gauge

from fastserve.metrics import PREFIX

KV_BLOCKS = Gauge(PREFIX + "worker_kv_blocks", "KV blocks this rank holds, by tier", ["tier"])
LOAD_SECONDS = Gauge(PREFIX + "worker_load_seconds", "Seconds this rank took to load its model shard")
