"""Iteration-level preemption on the live stack: with one batch slot, who finishes first.

The short request is sent once the long one is producing tokens (not after a sleep, which on a
loaded machine may be before the long one even reached the scheduler): from then on the order
is the policy's alone. Who finished first is read from the scheduler's own finish times (the
records GetRequest answers), not from when each client thread got its last message."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.records import settled_info

LONG_TOKENS = 200


def run(stub, prompt_ids, max_tokens, request_id: str, streamed: list | None = None) -> None:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    replies = []
    request = gateway_pb2.GenerateRequest(
        prompt_token_ids=prompt_ids, sampling=sampling, request_id=request_id
    )
    for reply in stub.Generate(request, timeout=300):
        replies.append(reply)
        if streamed is not None:
            streamed.extend(reply.token_ids)
    assert replies[-1].usage.completion_tokens == max_tokens


def finish_time(stub, request_id: str) -> float:
    """When the scheduler finished the job (its record, once written)."""
    info = settled_info(stub, request_id)
    assert info.state == "finished", info
    return info.finish_time


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
        streamed: list[int] = []
        long_id, short_id = f"long-{policy}", f"short-{policy}"
        long_job = threading.Thread(
            target=run, args=(stub, [2, *range(10, 40)], LONG_TOKENS, long_id, streamed)
        )
        long_job.start()
        deadline = time.monotonic() + 120
        while not streamed:  # the long job runs (and, under the MLFQ, is demoted) when the short one arrives
            assert time.monotonic() < deadline and long_job.is_alive(), "the long job did not start"
            time.sleep(0.005)
        sent_at = len(streamed)
        run(stub, [2, 5, 6, 7], 3, short_id)
        long_job.join(300)
        assert len(streamed) == LONG_TOKENS
        assert sent_at < LONG_TOKENS, (
            f"the long job had all its {LONG_TOKENS} tokens before the short one was sent"
        )
        finished = {"short": finish_time(stub, short_id), "long": finish_time(stub, long_id)}
        assert (finished["short"] < finished["long"]) is short_first, (sent_at, finished)
    finally:
        stack.stop()
