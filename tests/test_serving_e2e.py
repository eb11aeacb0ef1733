"""The serving path through real processes: gateway -> scheduler -> kvmanager -> worker, with Redis."""

from __future__ import annotations

import grpc
import pytest
import redis

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.internal_rpc import drained_kv_stats
from tests.records import settled_records
from tests.reference import MAX_TOKENS, PROMPTS, collect, generate_concurrently, greedy, hf_greedy

FR = common_pb2.FinishReason


def gateway(stack) -> gateway_pb2_grpc.GatewayStub:
    return gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))


def test_greedy_tokens_of_eight_concurrent_requests_equal_transformers(checkpoint_stack, tiny_checkpoint):
    results = generate_concurrently(gateway(checkpoint_stack))
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(tiny_checkpoint, tuple(prompt), MAX_TOKENS[i]), f"request {i} differs"


BAD_REQUESTS = {
    "empty prompt": (gateway_pb2.GenerateRequest(prompt=""), "prompt"),
    "neither input": (gateway_pb2.GenerateRequest(), "prompt"),
    "both inputs": (gateway_pb2.GenerateRequest(prompt="hi", prompt_token_ids=[2, 3]), "both"),
    "token outside vocabulary": (gateway_pb2.GenerateRequest(prompt_token_ids=[2, 10**6]), "vocabulary"),
    "too long": (
        gateway_pb2.GenerateRequest(
            prompt_token_ids=[2] * 200, sampling=common_pb2.SamplingParams(max_tokens=100)
        ),
        "exceeds",
    ),
    "max_tokens 0": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=0)),
        "max_tokens",
    ),
    "max_tokens above limit": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=100000)),
        "max_tokens",
    ),
    "negative temperature": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(temperature=-0.5)),
        "temperature",
    ),
    "top_p zero": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(top_p=0.0)),
        "top_p",
    ),
    "top_p above one": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(top_p=1.5)),
        "top_p",
    ),
    "negative top_k": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(top_k=-1)),
        "top_k",
    ),
    "oversized": (gateway_pb2.GenerateRequest(prompt="x" * (2 << 20)), "bytes"),
    "logprobs above limit": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(logprobs=21)),
        "--max-logprobs",
    ),
    "NaN penalty": (
        gateway_pb2.GenerateRequest(
            prompt="hi", sampling=common_pb2.SamplingParams(presence_penalty=float("nan"))
        ),
        "presence_penalty",
    ),
    "stop token outside vocabulary": (
        gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(stop_token_ids=[10**6])),
        "stop_token_ids",
    ),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_is_invalid_argument_and_service_keeps_serving(checkpoint_stack, name):
    stub = gateway(checkpoint_stack)
    request, word = BAD_REQUESTS[name]
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
    assert word in info.value.details()
    tokens, last = collect(stub, greedy([2, 42, 43], 3))
    assert len(tokens) == 3 and last.finish_reason == FR.FINISH_REASON_LENGTH


def test_duplicate_in_flight_request_id_is_invalid_argument(checkpoint_stack):
    stub = gateway(checkpoint_stack)
    first = stub.Generate(greedy([2, 7, 8], 200, request_id="dup-1"), timeout=120)
    next(first)  # in flight now
    with pytest.raises(grpc.RpcError) as info:
        collect(stub, greedy([2, 7, 8], 3, request_id="dup-1"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in info.value.details()
    first.cancel()


def test_redis_holds_final_state_and_counts(checkpoint_stack, redis_url):
    stub = gateway(checkpoint_stack)
    tokens, last = collect(stub, greedy([2, 60, 61, 62, 63], 6, request_id="redis-check"))
    record = settled_records(redis_url, ["redis-check"])["redis-check"]
    assert record["state"] == "finished"
    assert record["finish_reason"] == "length"
    assert int(record["prompt_tokens"]) == 5
    assert int(record["generated_tokens"]) == 6
    assert (
        float(record["finish_time"]) >= float(record["first_token_time"]) >= float(record["arrival_time"]) > 0
    )
    assert redis.Redis.from_url(redis_url).ttl("fastserve:req:redis-check") > 0
    info = stub.GetRequest(gateway_pb2.GetRequestRequest(request_id="redis-check"))
    assert (info.state, info.generated_tokens, info.prompt_tokens) == ("finished", 6, 5)


def test_cancel_and_disconnect_free_kv(checkpoint_stack, redis_url):
    stub = gateway(checkpoint_stack)
    stream = stub.Generate(greedy([2, 70, 71], 250, request_id="to-cancel"), timeout=120)
    next(stream)
    assert stub.Cancel(gateway_pb2.CancelRequest(request_id="to-cancel")).cancelled
    *_, last = stream
    assert last.finish_reason == FR.FINISH_REASON_CANCELLED

    dropped = stub.Generate(greedy([2, 80, 81], 250, request_id="to-drop"), timeout=120)
    next(dropped)
    dropped.cancel()  # the client goes away
    stats = drained_kv_stats(checkpoint_stack)
    assert stats.num_jobs == 0 and stats.free_gpu_blocks == stats.num_gpu_blocks
    settled_records(redis_url, ["to-drop"])  # the record is written after the KV is freed, not before
    assert stub.GetRequest(gateway_pb2.GetRequestRequest(request_id="to-drop")).state == "cancelled"


def test_server_info_reports_deployment(checkpoint_stack, tiny_checkpoint):
    info = gateway(checkpoint_stack).ServerInfo(gateway_pb2.ServerInfoRequest())
    assert info.vocab_size > 0 and info.max_model_len == 256 and info.block_size == 16
    assert info.num_gpu_blocks == 256 and info.policy and info.tensor_parallel_size == 1
