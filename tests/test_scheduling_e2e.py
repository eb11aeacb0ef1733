"""Iteration-level preemption on the live stack: with one batch slot, who finishes first."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack


def run(stub, prompt_ids, max_tokens, finished: dict, name: str) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    replies = list(
        stub.Generate(
            gateway_pb2.GenerateRequest(prompt_token_ids=prompt_ids, sampling=sampling), timeout=300
        )
    )
    assert replies[-1].usage.completion_tokens == max_tokens
    finished[name] = time.monotonic()


@pytest.mark.parametrize("policy, short_first", [("skip-join-mlfq", True), ("fcfs", False)])
def test_short_request_overtakes_long_one_only_under_skip_join(
    redis_url, tiny_checkpoint, policy, short_first
):
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--num-gpu-blocks",
        "64",
        "--policy",
        policy,
        "--max-batch-size",
        "1",
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        finished: dict[str, float] = {}
        long_job = threading.Thread(target=run, args=(stub, [2, *range(10, 40)], 200, finished, "long"))
        long_job.start()
        time.sleep(0.3)  # the long job is running (and, under the MLFQ, demoted) when the short one arrives
        assert "long" not in finished
        run(stub, [2, 5, 6, 7], 3, finished, "short")
        long_job.join(300)
        assert set(finished) == {"long", "short"}
        assert (finished["short"] < finished["long"]) is short_first, finished
    finally:
        stack.stop()
