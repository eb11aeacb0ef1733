"""`--stream-interval N`: a job's tokens reach its stream N at a time (its first at once, its last
with the outcome), and the client gets exactly what it gets with N = 1, in fewer messages."""

from __future__ import annotations

import grpc
import openai
import pytest

from fastserve.v1 import gateway_pb2_grpc
from tests.conftest import start_stack
from tests.reference import PROMPTS, greedy

MODEL = "tiny-opt"
INTERVAL = 3


@pytest.fixture(scope="module")
def interval_stack(redis_url, tiny_checkpoint):
    stack = start_stack(
        redis_url,
        *("--model", tiny_checkpoint, "--num-gpu-blocks", "256", "--served-model-name", MODEL),
        *("--stream-interval", str(INTERVAL)),
    )
    yield stack
    stack.stop()


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.addresses["http"] + "/v1", api_key="unused", max_retries=0)


def grpc_replies(stack, prompt: list[int], max_tokens: int) -> list:
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
    return list(stub.Generate(greedy(prompt, max_tokens), timeout=120))


def test_grpc_stream_carries_the_same_tokens_in_fewer_messages(checkpoint_stack, interval_stack):
    max_tokens = 20
    for prompt in PROMPTS[:3]:
        one = grpc_replies(checkpoint_stack, prompt, max_tokens)
        many = grpc_replies(interval_stack, prompt, max_tokens)
        tokens = [t for r in one for t in r.token_ids]
        assert [t for r in many for t in r.token_ids] == tokens and len(tokens) == max_tokens
        assert "".join(r.text for r in many) == "".join(r.text for r in one)
        assert len(many[0].token_ids) == 1  # the first token goes at once
        # 1 + ceil(19 / 3) messages carry tokens (the last with the outcome), not 20
        assert len([r for r in many if r.token_ids]) <= 1 + -(-(max_tokens - 1) // INTERVAL)
        assert many[-1].finish_reason == one[-1].finish_reason
        assert many[-1].usage.completion_tokens == max_tokens


def test_openai_streams_and_logprobs_equal_those_of_interval_one(checkpoint_stack, interval_stack):
    prompt, max_tokens = PROMPTS[7], 16
    kwargs = dict(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=2,
        extra_body={"ignore_eos": True},
    )
    whole = [client(s).completions.create(**kwargs).choices[0] for s in (checkpoint_stack, interval_stack)]
    assert whole[1].text == whole[0].text and whole[1].finish_reason == whole[0].finish_reason == "length"
    assert whole[1].logprobs.tokens == whole[0].logprobs.tokens
    assert whole[1].logprobs.token_logprobs == pytest.approx(whole[0].logprobs.token_logprobs, abs=1e-5)

    streams = [
        list(client(s).completions.create(stream=True, **kwargs)) for s in (checkpoint_stack, interval_stack)
    ]
    texts = ["".join(c.choices[0].text for c in chunks if c.choices) for chunks in streams]
    assert texts[1] == texts[0] == whole[0].text
    lps = [
        [
            lp
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for lp in c.choices[0].logprobs.token_logprobs
        ]
        for chunks in streams
    ]
    assert lps[1] == pytest.approx(lps[0], abs=1e-5) and len(lps[1]) == max_tokens
    assert len(streams[1]) < len(streams[0])  # fewer events for the same text


def test_a_stop_string_inside_a_group_of_tokens_still_ends_the_text_there(checkpoint_stack, interval_stack):
    prompt = PROMPTS[7]
    full = client(checkpoint_stack).completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    kwargs = dict(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
    )
    got = [client(s).completions.create(**kwargs).choices[0] for s in (checkpoint_stack, interval_stack)]
    assert got[1].text == got[0].text == text[: text.index(stop)]
    assert got[1].finish_reason == got[0].finish_reason == "stop"
    streamed = list(client(interval_stack).completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == got[0].text
