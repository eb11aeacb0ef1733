"""Tensor- and pipeline-parallel workers through the live stack (gloo on CPU) against transformers:
greedy tokens and logprobs."""

from __future__ import annotations

import grpc
import pytest

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.reference import MAX_TOKENS, PROMPTS, check_logprobs, generate_concurrently, hf_greedy


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)])
def test_parallel_greedy_tokens_equal_transformers(redis_url, tiny_checkpoint, tp, pp):
    stack = start_stack(
        redis_url, "--model", tiny_checkpoint, "--num-gpu-blocks", "128", "--tp", str(tp), "--pp", str(pp)
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        info = stub.ServerInfo(gateway_pb2.ServerInfoRequest())
        assert (info.tensor_parallel_size, info.pipeline_parallel_size) == (tp, pp)
        results = generate_concurrently(stub)
        sampling = common_pb2.SamplingParams(
            max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=5, prompt_logprobs=5
        )
        replies = list(
            stub.Generate(
                gateway_pb2.GenerateRequest(prompt_token_ids=PROMPTS[1], sampling=sampling), timeout=300
            )
        )
    finally:
        stack.stop()
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(tiny_checkpoint, tuple(prompt), MAX_TOKENS[i]), f"request {i} differs"
    # greedy logprobs (each token's and its top 5, the prompt's too) equal transformers' log_softmax
    check_logprobs(tiny_checkpoint, PROMPTS[1], [t for r in replies for t in r.token_ids], replies, 5)
