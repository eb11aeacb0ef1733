"""Each policy beside MLFQ serves the live stack: greedy tokens equal transformers' under preemption."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from fastserve.bench.length_predictor import design, ridge
from fastserve.services.scheduler.length_predictor import LengthPredictor, width
from fastserve.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.reference import MAX_TOKENS, PROMPTS, generate_concurrently, hf_greedy


@pytest.mark.parametrize("policy", ["las", "gittins", "gittins-slowdown", "vllm"])
def test_policy_serves_greedy_tokens_equal_to_transformers(redis_url, tiny_checkpoint, policy):
    # 2 batch slots and 12 KV blocks (192 tokens) for 8 concurrent requests: jobs are preempted,
    # and their KV swapped out or (vllm: always) dropped and recomputed, while they generate
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--num-gpu-blocks",
        "12",
        "--policy",
        policy,
        "--max-batch-size",
        "2",
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        info = stub.ServerInfo(gateway_pb2.ServerInfoRequest())
        assert info.policy == policy
        assert (info.swap_policy == "recompute") is (policy == "vllm")
        results = generate_concurrently(stub)
        for i, prompt in enumerate(PROMPTS):
            assert results[i] == hf_greedy(tiny_checkpoint, tuple(prompt), MAX_TOKENS[i]), f"request {i}"
    finally:
        stack.stop()


@pytest.mark.parametrize("policy", ["predicted-srpt", "predicted-order-mlfq"])
def test_predicted_policy_serves_greedy_tokens_equal_to_transformers(
    redis_url, tiny_checkpoint, tmp_path, policy
):
    # a length model over the reference prompts' ids (fit on their max_tokens: any model will do,
    # the scheduler must load it, predict every job and schedule by it under preemption)
    dim = 1 << 10
    prompts = [np.asarray(p) for p in PROMPTS]
    y = np.log(np.asarray(MAX_TOKENS, dtype=float))
    w = ridge(design(prompts, dim), len(prompts), width(dim), y - y.mean(), 1.0)
    w[-1] += y.mean()
    model = tmp_path / "lengths.npz"
    LengthPredictor(w.astype(np.float32), dim, 0.5, "test").save(str(model))
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--num-gpu-blocks",
        "12",
        "--policy",
        policy,
        "--max-batch-size",
        "2",
        "--length-predictor",
        str(model),
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        assert stub.ServerInfo(gateway_pb2.ServerInfoRequest()).policy == policy
        results = generate_concurrently(stub)
        for i, prompt in enumerate(PROMPTS):
            assert results[i] == hf_greedy(tiny_checkpoint, tuple(prompt), MAX_TOKENS[i]), f"request {i}"
    finally:
        stack.stop()
