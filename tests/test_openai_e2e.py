"""The OpenAI-compatible HTTP front, driven by the official `openai` client against real processes."""

from __future__ import annotations

import json

import grpc
import httpx2 as httpx
import openai
import pytest

from fastserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.internal_rpc import drained_kv_stats
from tests.records import settled_info
from tests.reference import PROMPTS, collect, greedy

MODEL = "tiny-opt"  # conftest's checkpoint_stack serves it under this --served-model-name


def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.addresses["http"] + "/v1", api_key="unused", max_retries=0)


def grpc_text(stack, prompt: list[int], max_tokens: int) -> tuple[str, gateway_pb2.GenerateResponse]:
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
    text = []
    last = None
    for reply in stub.Generate(greedy(prompt, max_tokens), timeout=120):
        text.append(reply.text)
        last = reply
    return "".join(text), last


def test_models_list_shows_served_model_name(checkpoint_stack):
    assert [m.id for m in client(checkpoint_stack).models.list().data] == [MODEL]


def test_completion_of_token_ids_equals_grpc_text_and_counts_usage(checkpoint_stack):
    prompt, max_tokens = PROMPTS[1], 20
    expected, last = grpc_text(checkpoint_stack, prompt, max_tokens)
    assert last.usage.completion_tokens == max_tokens
    reply = client(checkpoint_stack).completions.create(
        model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.choices[0].text == expected
    assert reply.choices[0].finish_reason == "length"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (
        len(prompt),
        max_tokens,
        len(prompt) + max_tokens,
    )


def test_streamed_completion_equals_grpc_text_and_ends_with_usage_chunk(checkpoint_stack):
    prompt, max_tokens = PROMPTS[7], 16  # its greedy text is mostly whole characters: many deltas
    expected, _ = grpc_text(checkpoint_stack, prompt, max_tokens)
    chunks = list(
        client(checkpoint_stack).completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) >= 2, "the completion did not stream"
    assert "".join(c.choices[0].text for c in text_chunks) == expected
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 16)


def test_chat_streams_content(checkpoint_stack):
    stream = client(checkpoint_stack).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] and chunks[-1].usage.completion_tokens == 12
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    whole = client(checkpoint_stack).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].message.content == content and whole.choices[0].message.role == "assistant"


def test_bad_request_is_400_with_error_object_and_next_request_is_served(checkpoint_stack):
    api = client(checkpoint_stack)
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL, prompt="hi", max_tokens=-1)
    assert info.value.status_code == 400
    error = info.value.body if "message" in info.value.body else info.value.body["error"]
    assert "max_tokens" in error["message"]
    with pytest.raises(openai.BadRequestError) as info:  # the gRPC validator's message, word for word
        api.completions.create(model=MODEL, prompt=[2, 10**6], max_tokens=2)
    assert "prompt_token_ids[1]: 1000000 is outside the vocabulary [0, 272)" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    reply = api.completions.create(model=MODEL, prompt="hi", max_tokens=3, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3


def test_raw_http_errors_health_and_metrics(checkpoint_stack):
    base = checkpoint_stack.addresses["http"]
    bad = httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": "many"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_tokens"
    assert httpx.get(f"{base}/health").status_code == 200
    metrics = httpx.get(f"{base}/metrics").text
    assert "fastserve:request_rejected_total" in metrics


def test_client_disconnect_cancels_the_job(checkpoint_stack):
    base = checkpoint_stack.addresses["http"]
    body = {"prompt": [2, 90, 91], "max_tokens": 250, "stream": True, "ignore_eos": True, "temperature": 0}
    with httpx.stream(
        "POST", f"{base}/v1/completions", json=body, headers={"X-Request-Id": "http-drop"}, timeout=60
    ) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: "):
                break  # one event, then the client goes away
    assert drained_kv_stats(checkpoint_stack).num_jobs == 0
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(checkpoint_stack.addresses["gateway"]))
    info = settled_info(stub, "http-drop")  # the record is written after the KV is freed, not before
    assert info.state == "cancelled" and info.generated_tokens < 250
    tokens, _ = collect(stub, greedy([2, 7], 2))
    assert len(tokens) == 2


def test_bench_replays_one_trace_over_grpc_and_over_openai_http(checkpoint_stack, tmp_path, capsys):
    from fastserve.bench.load import main as bench

    path = tmp_path / "bench.json"
    trace = ["--num-requests", "6", "--rate", "20", "--max-input-len", "24", "--max-output-len", "6"]
    trace += ["--json", str(path)]
    gateway = checkpoint_stack.addresses["gateway"]
    assert bench(["--backend", "grpc", "--address", gateway, *trace]) == 0
    http = ["--base-url", checkpoint_stack.addresses["http"], "--vocab-size", "272"]
    assert bench(["--backend", "openai", *http, "--address", gateway, *trace]) == 0
    over_grpc, over_http = json.loads(path.read_text())
    assert over_http["server"] == {"backend": "openai", "base_url": http[1], "model": MODEL}
    for result in (over_grpc, over_http):
        assert result["completed"] == result["num_requests"] == 6
        assert 0 < result["ttft"]["p50"] <= result["jct"]["p99"] and result["itl"]["mean"] > 0
        assert {"demotions", "promotions", "preemptions"} <= set(result)
    assert over_grpc["output_tokens"] == over_http["output_tokens"]  # the same trace, the same tokens
    assert over_grpc["input_tokens"] == over_http["input_tokens"]
    summary = capsys.readouterr().err
    assert summary.count("Serving Benchmark Result") == 2 and "Median TTFT (ms):" in summary
    assert "Output token throughput (tok/s):" in summary and "P99 ITL (ms):" in summary
