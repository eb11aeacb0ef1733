"""The gateway's Prometheus metrics: what clients saw (vLLM's names and model_name label; prefix fastserve:)."""

from prometheus_client import Counter

from fastserve.metrics import (
    LENGTH_BUCKETS,
    PREFIX,
    REQUEST_BUCKETS,
    TOKEN_BUCKETS,
    TTFT_BUCKETS,
    counter,
    histogram,
)

TTFT = histogram("time_to_first_token_seconds", "Arrival to first token", TTFT_BUCKETS)
INTER_TOKEN = histogram("inter_token_latency_seconds", "Time between two streamed messages", TOKEN_BUCKETS)
TPOT = histogram(
    "time_per_output_token_seconds", "Per request: first token to last / (output tokens - 1)", TOKEN_BUCKETS
)
E2E = histogram("e2e_request_latency_seconds", "Arrival to last message", REQUEST_BUCKETS)
REQUEST_PROMPT_TOKENS = histogram(
    "request_prompt_tokens", "Prompt tokens per finished request", LENGTH_BUCKETS
)
REQUEST_GENERATION_TOKENS = histogram(
    "request_generation_tokens", "Generated tokens per finished request", LENGTH_BUCKETS
)
REQUEST_MAX_TOKENS = histogram("request_params_max_tokens", "max_tokens of accepted requests", LENGTH_BUCKETS)
PROMPT_TOKENS = counter("prompt_tokens", "Prompt tokens of accepted requests")
GENERATION_TOKENS = counter("generation_tokens", "Tokens streamed to clients")
FINISHED = counter("request_success", "Requests that ended, by finish reason", ("finished_reason",))
REJECTED = Counter(
    PREFIX + "request_rejected",
    "Requests refused, by reason: invalid, too_large, overloaded, unauthenticated, not_found, timeout, ...",
    ["reason"],
)
STALLED = Counter(
    PREFIX + "stream_stalled",
    "Streams cancelled because their client stopped reading (--stream-send-timeout)",
)
