"""A worker's Prometheus metrics (FastServe's own): the KV pools it holds, how long loading took,
and the model step of decode-only iterations.

Every iteration's time is measured by the scheduler from the workers' replies
(`fastserve:worker_compute_seconds` on the scheduler's /metrics), prefill and swaps included.
`fastserve:worker_decode_step_seconds` is the part to hold against another engine's per-token
time: the model and sampling of iterations where every job feeds one token, timed in the worker.
"""

from prometheus_client import Gauge, Histogram

from fastserve.metrics import PREFIX, TOKEN_BUCKETS

KV_BLOCKS = Gauge(PREFIX + "worker_kv_blocks", "KV blocks this rank holds, by tier", ["tier"])
LOAD_SECONDS = Gauge(PREFIX + "worker_load_seconds", "Seconds this rank took to load its model shard")
DECODE_STEP_SECONDS = Histogram(
    PREFIX + "worker_decode_step_seconds",
    "Model + sampling time of iterations where every job decodes one token (this rank)",
    buckets=TOKEN_BUCKETS,
)
