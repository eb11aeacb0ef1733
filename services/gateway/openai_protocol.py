"""The OpenAI-compatible request bodies and their one mapping onto a GenerateRequest.

Field names and defaults follow OpenAI's API and vLLM's extra sampling fields
(`top_k`, `ignore_eos`, ...). `to_generate_request` is the only place an HTTP body
becomes the gRPC request that the shared validation then checks, so both fronts
accept and refuse the same things with the same messages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fastserve.v1 import common_pb2, gateway_pb2

from .validation import InvalidRequest


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingBody(BaseModel):
    """What /v1/completions and /v1/chat/completions share. Unknown fields are ignored (as vLLM does)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    ignore_eos: bool = False

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for values this server cannot honour; refused rather than silently ignored."""
        out = []
        if self.n != 1:
            out.append(("n", f"{self.n}: only n = 1 is supported"))
        if self.presence_penalty:
            out.append(("presence_penalty", f"{self.presence_penalty}: only 0 is supported"))
        if self.frequency_penalty:
            out.append(("frequency_penalty", f"{self.frequency_penalty}: only 0 is supported"))
        return out


class CompletionRequest(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.echo:
            out.append(("echo", "true: not supported"))
        if self.logprobs is not None:
            out.append(("logprobs", f"{self.logprobs}: not supported"))
        if self.best_of not in (None, 1):
            out.append(("best_of", f"{self.best_of}: only 1 is supported"))
        if self.suffix:
            out.append(("suffix", "not supported"))
        return out


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    add_generation_prompt: bool = True  # vLLM's extra field

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.logprobs:
            out.append(("logprobs", "true: not supported"))
        return out


def single_prompt(prompt: Any) -> str | list[int]:
    """One prompt, as text or token ids; a batch of several is refused."""
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(p, int) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) == 1:
        return single_prompt(prompt[0])
    if isinstance(prompt, list) and len(prompt) > 1:
        raise InvalidRequest(f"prompt: {len(prompt)} prompts in one request; send one prompt per request")
    raise InvalidRequest("prompt: must not be empty")


def to_generate_request(
    body: SamplingBody, prompt: str | list[int], max_tokens: int | None, request_id: str = ""
) -> gateway_pb2.GenerateRequest:
    """The HTTP body as the gRPC request; unset fields stay unset so the shared defaults apply."""
    for field, why in body.unsupported():
        raise InvalidRequest(f"{field}: {why}")
    sampling = common_pb2.SamplingParams(stop=[body.stop] if isinstance(body.stop, str) else body.stop or [])
    if max_tokens is not None:
        if max_tokens < 0:  # the proto field is unsigned; 0 and too-large values meet the shared check
            raise InvalidRequest(f"sampling.max_tokens: {max_tokens} must be >= 1")
        sampling.max_tokens = min(max_tokens, 2**32 - 1)
    if body.temperature is not None:
        sampling.temperature = body.temperature
    if body.top_p is not None:
        sampling.top_p = body.top_p
    if body.top_k is not None:
        sampling.top_k = 0 if body.top_k == -1 else body.top_k  # vLLM: -1 disables top-k
    if body.seed is not None:
        if body.seed < 0:
            raise InvalidRequest(f"sampling.seed: {body.seed} must be >= 0")
        sampling.seed = body.seed
    if body.ignore_eos:
        sampling.ignore_eos = True
    request = gateway_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:
        if any(token < 0 for token in prompt):
            raise InvalidRequest("prompt: token ids must be >= 0")
        request.prompt_token_ids.extend(prompt)
    return request
