"""The scheduler's Prometheus metrics: queues, transitions, iterations, KV.

Metrics vLLM also has: vLLM's names and its model_name label (see fastserve.metrics).
FastServe's own (demotions, promotions, swaps, recomputes, policy and plan time) keep
their names and have no model_name label.
"""

from prometheus_client import Counter, Gauge, Histogram

from fastserve.metrics import PREFIX, REQUEST_BUCKETS, TOKEN_BUCKETS, counter, gauge, histogram

RUNNING = gauge("num_requests_running", "Jobs in the batch of the last iteration")
WAITING = gauge("num_requests_waiting", "Live jobs not in the last batch, by queue level", ("level",))
QUEUE_TIME = histogram("request_queue_time_seconds", "Arrival to first scheduled", REQUEST_BUCKETS)
PREEMPTIONS = counter("num_preemptions", "Jobs left out of the batch after running in the previous one")
DEMOTIONS = Counter(PREFIX + "num_demotions", "Jobs moved one queue level down after using their quantum")
PROMOTIONS = Counter(PREFIX + "num_promotions", "Jobs promoted to the top queue after starving")
ITERATION_TIME = Histogram(
    PREFIX + "iteration_time_seconds", "One model iteration as the scheduler saw it", buckets=TOKEN_BUCKETS
)
ITERATION_TOKENS = histogram(
    "iteration_tokens_total",
    "Tokens fed in one iteration",
    (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
KV_BLOCKS_USED = Gauge(PREFIX + "kv_blocks_used", "KV blocks in use, by tier", ["tier"])
GPU_BLOCKS_USED = KV_BLOCKS_USED.labels("gpu")
SWAP_BYTES = Counter(PREFIX + "swap_bytes", "KV bytes moved between tiers, by direction", ["direction"])
SWAP_BYTES_OUT, SWAP_BYTES_IN = SWAP_BYTES.labels("out"), SWAP_BYTES.labels("in")
FINISHED = Counter(PREFIX + "request_finished", "Jobs that left the scheduler, by state", ["state"])
SWAP_SECONDS = Counter(PREFIX + "swap_transfer_seconds", "Time workers spent moving KV blocks (driver rank)")
SWAP_EXPOSED_SECONDS = Counter(
    PREFIX + "swap_exposed_seconds", "Time compute waited for KV transfers (driver rank)"
)
RECOMPUTES = Counter(PREFIX + "num_recomputes", "Jobs whose KV was dropped, to be rebuilt from their tokens")
POLICY_TIME = Histogram(
    PREFIX + "policy_decision_seconds",
    "Policy order + batch formation, per iteration",
    buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2),
)
PLAN_TIME = Histogram(
    PREFIX + "kv_plan_seconds",
    "KV manager Plan round trip, per iteration",
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2),
)
COMPUTE_TIME = Histogram(
    PREFIX + "worker_compute_seconds", "The driver rank's own step time", buckets=TOKEN_BUCKETS
)
JOB_LOG_DEGRADED = Gauge(
    PREFIX + "job_log_degraded", "1 while Redis takes no writes of the job log (records catch up later)"
)
