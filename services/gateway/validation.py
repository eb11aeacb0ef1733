"""Checks a GenerateRequest against the deployment's limits and fills in the defaults.

Every problem is one message that names the field and the limit, for an
INVALID_ARGUMENT status.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastserve.v1 import gateway_pb2

DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
MAX_REQUEST_ID_CHARS = 256


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    max_request_bytes: int
    max_stop_strings: int


@dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    ignore_eos: bool


def check_envelope(request: gateway_pb2.GenerateRequest, limits: Limits) -> None:
    """What can be judged before tokenizing."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"request: {size} bytes exceeds the limit of {limits.max_request_bytes} (--max-request-bytes)"
        )
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(
            f"request_id: {len(request.request_id)} characters exceeds the limit of {MAX_REQUEST_ID_CHARS}"
        )
    has_text = request.HasField("prompt")
    has_ids = len(request.prompt_token_ids) > 0
    if has_text == has_ids:
        raise InvalidRequest(
            "prompt / prompt_token_ids: set exactly one of them"
            + (" (both were set)" if has_text else " (neither was set)")
        )
    if has_text and not request.prompt:
        raise InvalidRequest("prompt: must not be empty")
    for i, token in enumerate(request.prompt_token_ids):
        if token >= limits.vocab_size:
            raise InvalidRequest(
                f"prompt_token_ids[{i}]: {token} is outside the vocabulary [0, {limits.vocab_size})"
            )


def resolve_sampling(request: gateway_pb2.GenerateRequest, limits: Limits) -> Sampling:
    s = request.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_tokens: {max_tokens} is outside [1, {limits.max_tokens_limit}] (--max-tokens-limit)"
        )
    temperature = s.temperature if s.HasField("temperature") else DEFAULT_TEMPERATURE
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"sampling.temperature: {temperature} must be a finite number >= 0")
    top_p = s.top_p if s.HasField("top_p") else DEFAULT_TOP_P
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest(f"sampling.top_p: {top_p} is outside (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else DEFAULT_TOP_K
    if top_k < 0:
        raise InvalidRequest(f"sampling.top_k: {top_k} must be >= 0 (0 disables it)")
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"sampling.stop: {len(s.stop)} strings exceeds the limit of {limits.max_stop_strings} (--max-stop-strings)"
        )
    if any(not text for text in s.stop):
        raise InvalidRequest("sampling.stop: stop strings must not be empty")
    return Sampling(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        ignore_eos=s.ignore_eos if s.HasField("ignore_eos") else False,
    )


def check_length(prompt_len: int, max_tokens: int, limits: Limits) -> None:
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + sampling.max_tokens ({max_tokens}) = {total} exceeds "
            f"the model's limit of {limits.max_model_len} tokens"
        )
