"""The scheduler's Prometheus metrics: queues, transitions, iterations, KV (names follow vLLM's, prefix fastserve:)."""

from prometheus_client import Counter, Gauge, Histogram

from fastserve.metrics import REQUEST_BUCKETS, TOKEN_BUCKETS

RUNNING = Gauge("fastserve:num_requests_running", "Jobs in the batch of the last iteration")
WAITING = Gauge(
    "fastserve:num_requests_waiting", "Live jobs not in the last batch, by queue level", ["level"]
)
QUEUE_TIME = Histogram(
    "fastserve:request_queue_time_seconds", "Arrival to first scheduled", buckets=REQUEST_BUCKETS
)
PREEMPTIONS = Counter(
    "fastserve:num_preemptions", "Jobs left out of the batch after running in the previous one"
)
DEMOTIONS = Counter("fastserve:num_demotions", "Jobs moved one queue level down after using their quantum")
PROMOTIONS = Counter("fastserve:num_promotions", "Jobs promoted to the top queue after starving")
ITERATION_TIME = Histogram(
    "fastserve:iteration_time_seconds", "One model iteration as the scheduler saw it", buckets=TOKEN_BUCKETS
)
ITERATION_TOKENS = Histogram(
    "fastserve:iteration_tokens",
    "Tokens fed in one iteration",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
)
KV_BLOCKS_USED = Gauge("fastserve:kv_blocks_used", "KV blocks in use, by tier", ["tier"])
SWAP_BYTES = Counter("fastserve:swap_bytes", "KV bytes moved between tiers, by direction", ["direction"])
FINISHED = Counter("fastserve:request_finished", "Jobs that left the scheduler, by state", ["state"])
SWAP_SECONDS = Counter("fastserve:swap_transfer_seconds", "Time workers spent moving KV blocks (driver rank)")
SWAP_EXPOSED_SECONDS = Counter(
    "fastserve:swap_exposed_seconds", "Time compute waited for KV transfers (driver rank)"
)
RECOMPUTES = Counter("fastserve:num_recomputes", "Jobs whose KV was dropped, to be rebuilt from their tokens")
POLICY_TIME = Histogram(
    "fastserve:policy_decision_seconds",
    "Policy order + batch formation, per iteration",
    buckets=(1e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 5e-3, 1e-2),
)
PLAN_TIME = Histogram(
    "fastserve:kv_plan_seconds",
    "KV manager Plan round trip, per iteration",
    buckets=(5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2),
)
COMPUTE_TIME = Histogram(
    "fastserve:worker_compute_seconds", "The driver rank's own step time", buckets=TOKEN_BUCKETS
)
