"""Checks a GenerateRequest against the deployment's limits and fills in the defaults.

Every problem is one message that names the field and the limit, for an
INVALID_ARGUMENT status.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from fastserve import structured
from fastserve.v1 import common_pb2, gateway_pb2

DEFAULT_MAX_TOKENS = 16
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
DEFAULT_TOP_K = 0
MAX_REQUEST_ID_CHARS = 256
MAX_STOP_STRING_CHARS = 1024  # one stop string; a longer one could never be matched within a job
PENALTY_RANGE = 2.0  # presence / frequency penalties lie in [-2, 2] (vLLM, OpenAI)
LOGIT_BIAS_RANGE = 100.0  # each logit_bias value lies in [-100, 100] (OpenAI)
_MASK64 = 2**64 - 1


class InvalidRequest(ValueError):
    pass


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_tokens_limit: int
    max_request_bytes: int
    max_stop_strings: int
    max_logprobs: int = 20
    max_n: int = 16
    max_prompt_chars: int = 0  # 0 = no bound of its own
    max_prompts_per_request: int = 64  # prompts in one /v1/completions request
    # why structured outputs cannot be served here ("" = they can): the workers constrain tokens
    # with the model's tokenizer, so a gateway that tokenizes with another one must refuse them
    structured_outputs_refused: str = ""

    def prompt_chars_limit(self) -> int:
        return self.max_prompt_chars or 1 << 62


@dataclass(frozen=True)
class Sampling:
    """A request's sampling after validation: n completions, each sampled with `job_sampling(i)`."""

    n: int
    resolved: common_pb2.ResolvedSampling  # completion 0's; completion i differs only in its seed

    def job_sampling(self, index: int) -> common_pb2.ResolvedSampling:
        """Completion `index`'s sampling: the request's seed for the first, one derived from it for
        the rest (which skip the prompt logprobs: the first completion carries them)."""
        job = common_pb2.ResolvedSampling()
        job.CopyFrom(self.resolved)
        if index:
            job.seed = derive_seed(self.resolved.seed, index)
            job.prompt_logprobs, job.prompt_top_logprobs = False, 0
        return job


def derive_seed(seed: int, index: int) -> int:
    """Completion `index`'s seed (index >= 1): a splitmix64 step away from the request's, so
    completions are unrelated to each other and to requests with neighbouring seeds."""
    x = ((seed ^ (index * 0xD1B54A32D192ED03)) + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


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
    check_prompt_chars("prompt", len(request.prompt), limits)
    if len(request.prompt_token_ids) >= limits.max_model_len:  # leaves no room for one output token
        raise InvalidRequest(
            f"prompt_token_ids: {len(request.prompt_token_ids)} tokens leave no room for output within "
            f"the model's limit of {limits.max_model_len} tokens"
        )
    check_stop(list(request.sampling.stop), limits)
    for i, token in enumerate(request.prompt_token_ids):
        check_token(f"prompt_token_ids[{i}]", token, limits)


def resolve_sampling(request: gateway_pb2.GenerateRequest, limits: Limits) -> Sampling:
    s = request.sampling
    max_tokens = s.max_tokens if s.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if not 1 <= max_tokens <= limits.max_tokens_limit:
        raise InvalidRequest(
            f"sampling.max_tokens: {max_tokens} is outside [1, {limits.max_tokens_limit}] (--max-tokens-limit)"
        )
    if s.min_tokens > max_tokens:
        raise InvalidRequest(
            f"sampling.min_tokens: {s.min_tokens} exceeds sampling.max_tokens ({max_tokens})"
        )
    n = s.n if s.HasField("n") else 1
    if not 1 <= n <= limits.max_n:
        raise InvalidRequest(f"sampling.n: {n} is outside [1, {limits.max_n}] (--max-n)")
    temperature = s.temperature if s.HasField("temperature") else DEFAULT_TEMPERATURE
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequest(f"sampling.temperature: {temperature} must be a finite number >= 0")
    top_p = s.top_p if s.HasField("top_p") else DEFAULT_TOP_P
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InvalidRequest(f"sampling.top_p: {top_p} is outside (0, 1]")
    top_k = s.top_k if s.HasField("top_k") else DEFAULT_TOP_K
    if top_k < 0:
        raise InvalidRequest(f"sampling.top_k: {top_k} must be >= 0 (0 disables it)")
    if not (math.isfinite(s.min_p) and 0 <= s.min_p <= 1):
        raise InvalidRequest(f"sampling.min_p: {s.min_p} is outside [0, 1]")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(s, name)
        if not (math.isfinite(value) and -PENALTY_RANGE <= value <= PENALTY_RANGE):
            raise InvalidRequest(
                f"sampling.{name}: {value} is outside [-{PENALTY_RANGE:g}, {PENALTY_RANGE:g}]"
            )
    repetition = s.repetition_penalty if s.HasField("repetition_penalty") else 1.0
    if not (math.isfinite(repetition) and repetition > 0):
        raise InvalidRequest(
            f"sampling.repetition_penalty: {repetition} must be a finite number > 0 (1 = off)"
        )
    if len(s.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"sampling.stop: {len(s.stop)} strings exceeds the limit of {limits.max_stop_strings} (--max-stop-strings)"
        )
    if any(not text for text in s.stop):
        raise InvalidRequest("sampling.stop: stop strings must not be empty")
    for i, token in enumerate(s.stop_token_ids):
        check_token(f"sampling.stop_token_ids[{i}]", token, limits)
    for token, bias in s.logit_bias.items():
        check_token("sampling.logit_bias", token, limits)
        if not (math.isfinite(bias) and -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE):
            raise InvalidRequest(
                f"sampling.logit_bias[{token}]: {bias} is outside [-{LOGIT_BIAS_RANGE:g}, {LOGIT_BIAS_RANGE:g}]"
            )
    for name in ("logprobs", "prompt_logprobs"):
        if getattr(s, name) > limits.max_logprobs:
            raise InvalidRequest(
                f"sampling.{name}: {getattr(s, name)} exceeds the limit of {limits.max_logprobs} (--max-logprobs)"
            )
    if s.HasField("structured_outputs"):
        if limits.structured_outputs_refused:
            raise InvalidRequest(f"sampling.structured_outputs: {limits.structured_outputs_refused}")
        if s.min_tokens:
            raise InvalidRequest(
                "sampling.min_tokens: must be 0 with sampling.structured_outputs (the grammar decides when to end)"
            )
        try:
            structured.check(s.structured_outputs)
        except structured.InvalidConstraint as exc:
            raise InvalidRequest(str(exc)) from None
    resolved = common_pb2.ResolvedSampling(
        max_tokens=max_tokens,
        min_tokens=s.min_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=s.min_p,
        seed=s.seed if s.HasField("seed") else secrets.randbits(63),
        ignore_eos=s.ignore_eos,
        stop_token_ids=s.stop_token_ids,
        stop=s.stop,
        include_stop_str_in_output=s.include_stop_str_in_output,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=repetition,
        logit_bias=s.logit_bias,
        logprobs=s.HasField("logprobs"),
        top_logprobs=s.logprobs,
        prompt_logprobs=s.HasField("prompt_logprobs"),
        prompt_top_logprobs=s.prompt_logprobs,
    )
    if s.HasField("structured_outputs"):
        resolved.structured_outputs.CopyFrom(s.structured_outputs)
    return Sampling(n=n, resolved=resolved)


def check_prompt_chars(field: str, chars: int, limits: Limits) -> None:
    """Before tokenizing: a prompt longer than --max-prompt-chars is refused unread."""
    if chars > limits.prompt_chars_limit():
        raise InvalidRequest(
            f"{field}: {chars} characters exceeds the limit of {limits.max_prompt_chars} (--max-prompt-chars)"
        )


def check_stop(stop: list[str], limits: Limits) -> None:
    if len(stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"sampling.stop: {len(stop)} strings exceeds the limit of {limits.max_stop_strings} (--max-stop-strings)"
        )
    for i, text in enumerate(stop):
        if len(text) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest(
                f"sampling.stop[{i}]: {len(text)} characters exceeds the limit of {MAX_STOP_STRING_CHARS}"
            )


def check_token(field: str, token: int, limits: Limits) -> None:
    """A token id a client sent (over HTTP any integer, over gRPC a uint32) lies in the vocabulary."""
    if not 0 <= token < limits.vocab_size:
        raise InvalidRequest(f"{field}: {token} is outside the vocabulary [0, {limits.vocab_size})")


def check_length(prompt_len: int, max_tokens: int, limits: Limits) -> None:
    total = prompt_len + max_tokens
    if total > limits.max_model_len:
        raise InvalidRequest(
            f"prompt ({prompt_len} tokens) + sampling.max_tokens ({max_tokens}) = {total} exceeds "
            f"the model's limit of {limits.max_model_len} tokens"
        )
