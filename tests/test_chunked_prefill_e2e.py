"""Chunked prefill through real processes: long prompts prefilled in chunks beside other jobs' decodes
give Hugging Face's greedy tokens, and no iteration feeds more than --max-num-batched-tokens."""

from __future__ import annotations

import grpc
import pytest

from fastserve.v1 import gateway_pb2_grpc
from tests.conftest import start_stack
from tests.reference import MAX_TOKENS, PROMPTS, collect, generate_concurrently, greedy, hf_greedy
from tests.test_observability_e2e import scrape

BUDGET = 20  # tokens per iteration: PROMPTS[3] (31 tokens) and PROMPTS[7] (46) need 2 and 3 chunks


@pytest.fixture(scope="module")
def chunked_stack(redis_url, tiny_checkpoint):
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--num-gpu-blocks",
        "256",
        "--enable-chunked-prefill",
        "true",
        "--max-num-batched-tokens",
        str(BUDGET),
    )
    yield stack
    stack.stop()


def iteration_tokens(stack) -> tuple[float, float]:
    """(iterations that fed at most 32 tokens, all iterations) from the scheduler's histogram."""
    values = scrape(stack.addresses["scheduler-metrics"])
    small = sum(
        v for k, v in values.items() if k.startswith("fastserve:iteration_tokens") and 'le="32.0"' in k
    )
    total = sum(v for k, v in values.items() if k.startswith("fastserve:iteration_tokens") and "_count" in k)
    return small, total


def test_long_prompts_are_chunked_beside_decodes_and_greedy_tokens_equal_transformers(
    chunked_stack, tiny_checkpoint
):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(chunked_stack.addresses["gateway"]))
    results = generate_concurrently(stub)
    for i, prompt in enumerate(PROMPTS):
        assert results[i] == hf_greedy(tiny_checkpoint, tuple(prompt), MAX_TOKENS[i]), f"request {i} differs"
    small, total = iteration_tokens(chunked_stack)
    assert total > 0 and small == total  # the 46-token prompt never ran whole


def test_a_prompt_that_must_prefill_whole_runs_over_the_budget(chunked_stack, tiny_checkpoint):
    """Prompt logprobs need the whole prompt in one step: that job is not chunked, and runs all the same."""
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(chunked_stack.addresses["gateway"]))
    request = greedy(PROMPTS[7], 4)
    request.sampling.prompt_logprobs = 0
    tokens, last = collect(stub, request)
    assert tokens == hf_greedy(tiny_checkpoint, tuple(PROMPTS[7]), 4)
