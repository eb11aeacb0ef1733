"""The OpenAI-compatible request bodies and their one mapping onto a GenerateRequest.

Field names and defaults follow OpenAI's API and vLLM's extra sampling fields
(`top_k`, `ignore_eos`, ...). `to_generate_request` is the only place an HTTP body
becomes the gRPC request that the shared validation then checks, so both fronts
accept and refuse the same things with the same messages.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fastserve.v1 import common_pb2, gateway_pb2

from .validation import InvalidRequest, Limits, check_prompt_chars, check_stop, check_token

# Request fields that change what is generated and that this server does not implement: a body
# carrying one (with a value other than its neutral one) is refused with 400 naming it, never
# silently ignored. Remove a field from here when it is implemented.
UNSUPPORTED_FIELDS = [
    "tools",  # OPT has no tool-calling template
    "tool_choice",
    "functions",
    "function_call",
    "parallel_tool_calls",
    "guided_whitespace_pattern",  # JSON is generated without optional whitespace
]
NEUTRAL_VALUES = {  # values of UNSUPPORTED_FIELDS that ask for nothing beyond plain text
    "tool_choice": ["none"],
    "parallel_tool_calls": [False],
}
UINT32_MAX = 2**32 - 1
UINT32_FIELDS = ("n", "top_k", "min_tokens", "logprobs", "top_logprobs", "prompt_logprobs")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsBody(BaseModel):
    """vLLM's `structured_outputs` object (and its older `guided_*` fields): one of these."""

    model_config = ConfigDict(populate_by_name=True)

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def specs(self) -> list[common_pb2.StructuredOutputs]:
        out = []
        if self.json_ is not None:
            out.append(_json_spec(self.json_))
        if self.regex is not None:
            out.append(common_pb2.StructuredOutputs(regex=self.regex))
        if self.choice is not None:
            out.append(common_pb2.StructuredOutputs(choice=common_pb2.Choices(choices=self.choice)))
        if self.grammar is not None:
            out.append(common_pb2.StructuredOutputs(grammar=self.grammar))
        if self.json_object:
            out.append(common_pb2.StructuredOutputs(json_object=True))
        return out


def _json_spec(schema: dict[str, Any] | str) -> common_pb2.StructuredOutputs:
    return common_pb2.StructuredOutputs(json=schema if isinstance(schema, str) else json.dumps(schema))


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
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # vLLM's extra sampling fields
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    ignore_eos: bool = False
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # accepted and ignored: xgrammar is the one backend

    def structured(self) -> common_pb2.StructuredOutputs | None:
        """The one output constraint the body asks for (None: unconstrained); two are refused."""
        asked: list[tuple[str, common_pb2.StructuredOutputs]] = []
        if self.response_format is not None and self.response_format.type != "text":
            rf = self.response_format
            if rf.type == "json_object":
                asked.append(("response_format", common_pb2.StructuredOutputs(json_object=True)))
            elif rf.json_schema is None or rf.json_schema.schema_ is None:
                raise InvalidRequest("response_format.json_schema.schema: required with type json_schema")
            else:
                asked.append(("response_format", _json_spec(rf.json_schema.schema_)))
        if self.structured_outputs is not None:
            asked += [("structured_outputs", spec) for spec in self.structured_outputs.specs()]
        guided = StructuredOutputsBody(
            json_=self.guided_json,
            regex=self.guided_regex,
            choice=self.guided_choice,
            grammar=self.guided_grammar,
        )
        asked += [("guided_*", spec) for spec in guided.specs()]
        if len(asked) > 1:
            names = ", ".join(sorted({name for name, _ in asked}))
            raise InvalidRequest(f"structured_outputs: ask for one constraint, not {len(asked)} ({names})")
        return asked[0][1] if asked else None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for values this server cannot honour; refused rather than silently ignored."""
        out = []
        extra = self.model_extra or {}
        for name in UNSUPPORTED_FIELDS:
            value = extra[name] if name in extra else getattr(self, name, None)
            if value not in (None, [], {}) and value not in NEUTRAL_VALUES.get(name, []):
                out.append((name, "not supported by this server (refused rather than ignored)"))
        return out

    def check_sizes(self, limits: Limits) -> None:
        """The limits that need no tokenizer, checked before any work: values out of range name
        the value sent, texts are measured in characters."""
        for field, why in self.unsupported():
            raise InvalidRequest(f"{field}: {why}")
        max_tokens = self.max_tokens_sent()
        if max_tokens is not None and max_tokens > limits.max_tokens_limit:
            raise InvalidRequest(
                f"sampling.max_tokens: {max_tokens} is outside [1, {limits.max_tokens_limit}] (--max-tokens-limit)"
            )
        for name in UINT32_FIELDS:
            value = getattr(self, name, None)
            if isinstance(value, int) and value > UINT32_MAX:
                raise InvalidRequest(f"sampling.{name}: {value} is outside [0, {UINT32_MAX}]")
        if self.seed is not None and self.seed >= 2**63:
            raise InvalidRequest(f"sampling.seed: {self.seed} is outside [0, {2**63 - 1}]")
        if any(t > UINT32_MAX for t in self.stop_token_ids or ()):
            raise InvalidRequest(f"sampling.stop_token_ids: a token id above {UINT32_MAX}")
        check_stop([self.stop] if isinstance(self.stop, str) else self.stop or [], limits)
        if self.logit_bias and len(self.logit_bias) > limits.vocab_size:
            raise InvalidRequest(
                f"sampling.logit_bias: {len(self.logit_bias)} entries, more than the vocabulary's {limits.vocab_size}"
            )

    def max_tokens_sent(self) -> int | None:
        return self.max_tokens

    def num_logprobs(self) -> int | None:
        """How many alternatives per generated token (None: no logprobs)."""
        return None


class CompletionRequest(SamplingBody):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.best_of not in (None, 1, self.n):
            out.append(("best_of", f"{self.best_of}: only 1 is supported"))
        if self.suffix:
            out.append(("suffix", "not supported"))
        return out

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def check_sizes(self, limits: Limits) -> None:
        super().check_sizes(limits)
        if isinstance(self.prompt, str):
            check_prompt_chars("prompt", len(self.prompt), limits)
        elif self.prompt and isinstance(self.prompt[0], str):
            check_prompt_chars("prompt", sum(len(p) for p in self.prompt), limits)  # type: ignore[arg-type]
        # token ids are checked here: JSON allows any integer, a GenerateRequest only uint32s
        elif self.prompt and isinstance(self.prompt[0], int):  # one prompt: gRPC's message
            for i, token in enumerate(self.prompt):
                check_token(f"prompt_token_ids[{i}]", token, limits)  # type: ignore[arg-type]
        else:
            for k, ids in enumerate(self.prompt):
                for i, token in enumerate(ids):  # type: ignore[union-attr,arg-type]
                    check_token(f"prompt[{k}].prompt_token_ids[{i}]", token, limits)


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
    top_logprobs: int | None = None
    add_generation_prompt: bool = True  # vLLM's extra field

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def max_tokens_sent(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check_sizes(self, limits: Limits) -> None:
        super().check_sizes(limits)
        if len(self.messages) > limits.max_model_len:  # each message takes at least one token
            raise InvalidRequest(
                f"messages: {len(self.messages)} messages cannot fit the model's limit of "
                f"{limits.max_model_len} tokens"
            )
        check_prompt_chars("messages", sum(len(m.text()) for m in self.messages), limits)


def to_generate_request(
    body: SamplingBody, prompt: str | list[int], max_tokens: int | None, request_id: str = ""
) -> gateway_pb2.GenerateRequest:
    """The HTTP body as the gRPC request; unset fields stay unset so the shared defaults apply."""
    for field, why in body.unsupported():
        raise InvalidRequest(f"{field}: {why}")
    sampling = common_pb2.SamplingParams(stop=[body.stop] if isinstance(body.stop, str) else body.stop or [])
    if max_tokens is not None:
        if not 0 <= max_tokens <= UINT32_MAX:  # the proto field is uint32; 0 meets the shared check
            raise InvalidRequest(f"sampling.max_tokens: {max_tokens} is outside [1, {UINT32_MAX}]")
        sampling.max_tokens = max_tokens
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
    for name in ("n", "presence_penalty", "frequency_penalty", "min_p", "repetition_penalty", "min_tokens"):
        value = getattr(body, name)
        if value is not None:
            if name in ("n", "min_tokens") and value < 0:
                raise InvalidRequest(f"sampling.{name}: {value} must be >= 0")
            setattr(sampling, name, value)
    if body.stop_token_ids:
        if any(t < 0 for t in body.stop_token_ids):
            raise InvalidRequest("sampling.stop_token_ids: token ids must be >= 0")
        sampling.stop_token_ids.extend(body.stop_token_ids)
    if body.include_stop_str_in_output:
        sampling.include_stop_str_in_output = True
    for key, bias in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= 2**32:
            raise InvalidRequest(f"sampling.logit_bias: key {key!r} is not a token id")
        sampling.logit_bias[int(key)] = bias
    for name, value in (("logprobs", body.num_logprobs()), ("prompt_logprobs", body.prompt_logprobs)):
        if value is not None:
            if value < 0:
                raise InvalidRequest(f"sampling.{name}: {value} must be >= 0")
            setattr(sampling, name, value)
    if (spec := body.structured()) is not None:
        sampling.structured_outputs.CopyFrom(spec)
    request = gateway_pb2.GenerateRequest(request_id=request_id, sampling=sampling)
    if isinstance(prompt, str):
        request.prompt = prompt
    else:  # ids a client sent were checked against the vocabulary by check_sizes
        request.prompt_token_ids.extend(prompt)
    return request
