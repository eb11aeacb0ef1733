"""The gateway's Prometheus metrics: what a client saw (names follow vLLM's, prefix fastserve:)."""

from prometheus_client import Counter, Histogram

from fastserve.metrics import REQUEST_BUCKETS, TOKEN_BUCKETS, TTFT_BUCKETS

TTFT = Histogram(
    "fastserve:time_to_first_token_seconds",
    "Arrival to first token",
    buckets=TTFT_BUCKETS,
)
INTER_TOKEN = Histogram(
    "fastserve:inter_token_latency_seconds", "Time between two streamed messages", buckets=TOKEN_BUCKETS
)
E2E = Histogram("fastserve:e2e_request_latency_seconds", "Arrival to last message", buckets=REQUEST_BUCKETS)
PROMPT_TOKENS = Counter("fastserve:prompt_tokens", "Prompt tokens of accepted requests")
GENERATION_TOKENS = Counter("fastserve:generation_tokens", "Tokens streamed to clients")
FINISHED = Counter("fastserve:request_success", "Requests that ended, by finish reason", ["finished_reason"])
REJECTED = Counter("fastserve:request_rejected", "Requests refused with INVALID_ARGUMENT")
