"""What lm-evaluation-harness, LangChain and vLLM's users need beyond plain generation, with the
official `openai` client against real processes: echo + prompt scoring (equal to transformers'
log_softmax), several prompts per request, structured outputs (response_format / vLLM's fields)."""

from __future__ import annotations

import json
import time

import grpc
import httpx2 as httpx
import jsonschema
import openai
import pytest

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.internal_rpc import scheduler_info
from tests.reference import hf_log_softmax

MODEL = "tiny-opt"  # conftest's checkpoint_stack serves it under this name
SCHEMA = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
    },
    "required": ["age", "color", "tags"],
    "additionalProperties": False,
}


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.addresses["http"] + "/v1", api_key="unused", max_retries=0)


def reference_logprobs(checkpoint: str, ids: list[int]) -> list[float]:
    """transformers' logprob of each token after the first, given the ones before it."""
    lp = hf_log_softmax(checkpoint, ids)
    return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_scores_the_prompt_like_transformers(checkpoint_stack, tiny_checkpoint, stream):
    """lm-eval's loglikelihood request: echo, logprobs=1, max_tokens 0 (score only) or 1."""
    prompts = [[2, 5, 17, 99, 250, 31, 7], [2, *range(40, 70)]]
    for max_tokens in (0, 1):
        reply = client(checkpoint_stack).completions.create(
            model=MODEL,
            prompt=prompts,
            echo=True,
            logprobs=1,
            max_tokens=max_tokens,
            temperature=0,
            stream=stream,
        )
        chunks = list(reply) if stream else [reply]
        for k, prompt in enumerate(prompts):
            parts = [c for chunk in chunks for c in chunk.choices if c.index == k]
            token_logprobs = [lp for c in parts if c.logprobs for lp in c.logprobs.token_logprobs]
            tops = [t for c in parts if c.logprobs for t in c.logprobs.top_logprobs]
            assert len(token_logprobs) == len(prompt) + max_tokens
            assert token_logprobs[0] is None and tops[0] is None  # the first token has none
            expected = reference_logprobs(tiny_checkpoint, prompt)
            assert token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
            # lm-eval's is_greedy: the token's logprob against the best alternative listed
            assert all(
                max(t.values()) >= lp - 1e-6 for t, lp in zip(tops[1:], token_logprobs[1:], strict=True)
            )
            text = "".join(c.text for c in parts)
            if max_tokens == 0:  # only the scored prompt comes back
                assert text == checkpoint_stack_decode(prompt)
                assert parts[-1].finish_reason == "length"


def checkpoint_stack_decode(ids: list[int]) -> str:
    from fastserve.tokenizer import ByteTokenizer  # the tiny checkpoint has no tokenizer files

    return ByteTokenizer().decode(ids)


def test_echo_of_text_prompt_and_max_tokens_zero_usage(checkpoint_stack, tiny_checkpoint):
    reply = client(checkpoint_stack).completions.create(
        model=MODEL,
        prompt="Hello there",
        echo=True,
        logprobs=0,
        max_tokens=0,
        extra_body={"prompt_logprobs": 1},
    )
    choice = reply.choices[0]
    assert choice.text == "Hello there"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (12, 0)  # BOS + 11 bytes
    ids = [2, *(b + 4 for b in b"Hello there")]
    expected = reference_logprobs(tiny_checkpoint, ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    prompt_logprobs = choice.model_extra["prompt_logprobs"]  # vLLM's field
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(ids)
    assert [p[str(t)]["logprob"] for p, t in zip(prompt_logprobs[1:], ids[1:], strict=True)] == pytest.approx(
        expected, abs=1e-4
    )


def test_max_tokens_zero_without_echo_is_refused(checkpoint_stack):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client(checkpoint_stack).completions.create(model=MODEL, prompt="Hi", max_tokens=0)


@pytest.mark.parametrize(("stream", "ids"), [(False, False), (True, False), (False, True), (True, True)])
def test_three_prompts_with_n_2_give_six_indexed_choices(checkpoint_stack, stream, ids):
    prompts = ["One", "Two!", "Three three"]
    if ids:
        prompts = [[2, *(b + 4 for b in p.encode())] for p in prompts]
    kwargs = dict(
        model=MODEL, prompt=prompts, n=2, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    api = client(checkpoint_stack)
    singles = [api.completions.create(**{**kwargs, "prompt": p, "n": 1}).choices[0].text for p in prompts]
    if stream:
        chunks = list(api.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
        texts: dict[int, str] = {}
        for chunk in chunks:
            for c in chunk.choices:
                texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunks[-1].usage
    else:
        reply = api.completions.create(**kwargs)
        assert [c.index for c in reply.choices] == list(range(6))
        texts = {c.index: c.text for c in reply.choices}
        usage = reply.usage
    assert sorted(texts) == list(range(6))
    for k in range(3):  # greedy: both completions of prompt k equal the prompt alone
        assert texts[2 * k] == texts[2 * k + 1] == singles[k]
    assert (usage.prompt_tokens, usage.completion_tokens) == (4 + 5 + 12, 36)


def test_too_many_prompts_is_refused_naming_the_limit(checkpoint_stack):
    with pytest.raises(openai.BadRequestError, match="--max-prompts-per-request"):
        client(checkpoint_stack).completions.create(model=MODEL, prompt=["a"] * 65, max_tokens=1)


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_response_format_json_schema_validates(checkpoint_stack, route):
    api = client(checkpoint_stack)
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    for seed in range(3):
        if route == "chat":
            reply = api.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "A person"}],
                response_format=response_format,
                max_tokens=150,
                seed=seed,
            )
            text = reply.choices[0].message.content
        else:
            reply = api.completions.create(
                model=MODEL,
                prompt="A person:",
                max_tokens=150,
                seed=seed,
                extra_body={"response_format": response_format},
            )
            text = reply.choices[0].text
        assert reply.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_vllm_structured_outputs_and_guided_fields(checkpoint_stack):
    api = client(checkpoint_stack)

    def complete(seed: int = 1, **extra) -> str:
        reply = api.completions.create(model=MODEL, prompt="x", max_tokens=60, seed=seed, extra_body=extra)
        return reply.choices[0].text

    assert complete(structured_outputs={"choice": ["yes", "no"]}) in ("yes", "no")
    assert complete(guided_choice=["left", "right"]) in ("left", "right")
    out = complete(structured_outputs={"regex": "[0-9]{4}"})
    assert len(out) == 4 and out.isdigit()
    # any object: keys and values are unbounded, so the random-weight model is nudged (logit_bias on
    # '"' and '}') to close its strings and the object within max_tokens
    nudge = {str(ord('"') + 4): 6, str(ord("}") + 4): 6}
    for seed in range(3):
        assert isinstance(
            json.loads(complete(seed, response_format={"type": "json_object"}, logit_bias=nudge)), dict
        )
    jsonschema.validate(json.loads(complete(guided_json=SCHEMA)), SCHEMA)
    assert set(complete(guided_grammar='root ::= [ab]+ "."')[:-1]) <= {"a", "b"}


def test_bad_constraints_and_tools_are_clear_400s(checkpoint_stack):
    api = client(checkpoint_stack)
    with pytest.raises(openai.BadRequestError, match="structured_outputs.regex: does not parse"):
        api.completions.create(model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "(["}})
    with pytest.raises(openai.BadRequestError, match="one constraint"):
        api.completions.create(
            model=MODEL, prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["b"]}
        )
    with pytest.raises(openai.BadRequestError, match="tools"):
        api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )


def test_vllm_tokenizer_and_info_routes(checkpoint_stack):
    base = checkpoint_stack.addresses["http"]
    with httpx.Client(base_url=base, timeout=30) as http:
        tokens = http.post("/tokenize", json={"prompt": "Hi!", "return_token_strs": True}).json()
        assert tokens["tokens"] == [2, *(b + 4 for b in b"Hi!")] and tokens["count"] == 4
        assert tokens["token_strs"][1:] == ["H", "i", "!"] and tokens["max_model_len"] == 256
        bare = http.post("/tokenize", json={"prompt": "Hi!", "add_special_tokens": False}).json()
        assert bare["tokens"] == tokens["tokens"][1:] and bare["token_strs"] is None
        chat = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()
        assert chat["count"] > 2
        assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hi!"}
        refused = http.post("/detokenize", json={"tokens": [5, 1 << 20]}).json()["error"]
        assert refused["code"] == 400 and refused["param"] == "tokens[1]"
        assert refused["message"] == "tokens[1]: 1048576 is outside the vocabulary [0, 272)"
        assert http.post("/tokenize", json={"prompt": "x", "model": "other"}).status_code == 404
        assert http.get("/tokenizer_info").json()["eos_token_id"] == 2
        version = http.get("/version").json()["version"]
        assert http.get("/ping").status_code == 200 and http.post("/ping").status_code == 200
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(checkpoint_stack.addresses["gateway"]))
    assert stub.ServerInfo(gateway_pb2.ServerInfoRequest(), timeout=30).version == version  # one owner
    card = client(checkpoint_stack).models.retrieve(MODEL)
    assert (card.id, card.owned_by) == (MODEL, "fastserve")
    with pytest.raises(openai.NotFoundError):
        client(checkpoint_stack).models.retrieve("no-such-model")


def test_langchain_with_structured_output_returns_the_pydantic_model(checkpoint_stack):
    from typing import Literal

    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Person(BaseModel):
        age: int = Field(ge=0, le=120)
        color: Literal["red", "green", "blue"]
        tags: list[str] = Field(max_length=3)

    llm = ChatOpenAI(
        base_url=checkpoint_stack.addresses["http"] + "/v1", api_key="x", model=MODEL, max_tokens=200, seed=3
    )
    person = llm.with_structured_output(Person).invoke("Describe a person.")  # response_format json_schema
    assert isinstance(person, Person)


def test_streamed_echo_with_n_2_gives_each_completion_its_prompt_logprobs(checkpoint_stack, tiny_checkpoint):
    """The prompt's logprobs are computed by its first completion; the second waits for them."""
    prompts = [[2, 30, 31, 32, 33], [2, 90, 91]]
    chunks = list(
        client(checkpoint_stack).completions.create(
            model=MODEL, prompt=prompts, n=2, echo=True, logprobs=0, max_tokens=3, seed=5, stream=True
        )
    )
    for index in range(4):
        prompt = prompts[index // 2]
        parts = [c for chunk in chunks for c in chunk.choices if c.index == index]
        token_logprobs = [lp for c in parts if c.logprobs for lp in c.logprobs.token_logprobs]
        assert len(token_logprobs) == len(prompt) + 3 and token_logprobs[0] is None
        expected = reference_logprobs(tiny_checkpoint, prompt)
        assert token_logprobs[1 : len(prompt)] == pytest.approx(expected, abs=1e-4)
        assert parts[0].text.startswith(checkpoint_stack_decode(prompt))


def test_closing_a_several_prompt_stream_cancels_every_prompt(checkpoint_stack):
    stream = client(checkpoint_stack).completions.create(
        model=MODEL, prompt=["a", "b", "c"], n=2, max_tokens=200, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 60
    while (info := scheduler_info(checkpoint_stack)).num_running + info.num_waiting:
        assert time.monotonic() < deadline, f"jobs left running after the client went away: {info}"
        time.sleep(0.1)


def test_grpc_structured_outputs_in_sampling_params(checkpoint_stack):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(checkpoint_stack.addresses["gateway"]))
    sampling = common_pb2.SamplingParams(max_tokens=150, seed=2)
    sampling.structured_outputs.json = json.dumps(SCHEMA)
    text = "".join(
        r.text
        for r in stub.Generate(
            gateway_pb2.GenerateRequest(prompt="A person:", sampling=sampling), timeout=120
        )
    )
    jsonschema.validate(json.loads(text), SCHEMA)
    sampling.structured_outputs.regex = "(["
    with pytest.raises(grpc.RpcError) as refused:
        list(stub.Generate(gateway_pb2.GenerateRequest(prompt="x", sampling=sampling), timeout=30))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "structured_outputs.regex" in refused.value.details()


def test_grpc_tokenize_and_detokenize(checkpoint_stack):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(checkpoint_stack.addresses["gateway"]))
    reply = stub.Tokenize(gateway_pb2.TokenizeRequest(text="Hi!"), timeout=30)
    assert list(reply.token_ids) == [2, *(b + 4 for b in b"Hi!")] and reply.max_model_len == 256
    bare = stub.Tokenize(gateway_pb2.TokenizeRequest(text="Hi!", add_special_tokens=False), timeout=30)
    assert list(bare.token_ids) == list(reply.token_ids)[1:]
    assert stub.Detokenize(gateway_pb2.DetokenizeRequest(token_ids=reply.token_ids), timeout=30).text == "Hi!"
    with pytest.raises(grpc.RpcError) as refused:
        stub.Detokenize(gateway_pb2.DetokenizeRequest(token_ids=[9999]), timeout=30)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details() == "token_ids[0]: 9999 is outside the vocabulary [0, 272)"


def test_chat_prompt_logprobs_in_vllms_top_level_field(checkpoint_stack):
    reply = client(checkpoint_stack).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        extra_body={"prompt_logprobs": 2},
    )
    prompt_logprobs = reply.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) == reply.usage.prompt_tokens
    assert all(
        2 <= len(p) <= 3 and all("decoded_token" in e for e in p.values()) for p in prompt_logprobs[1:]
    )
