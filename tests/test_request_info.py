"""A request with n > 1 as GetRequest answers it: its completions' records merged."""

from __future__ import annotations

from fastserve.services.gateway.request_info import merge
from fastserve.v1 import gateway_pb2 as pb


def completion(i: int, state: str, **fields) -> pb.RequestInfo:
    return pb.RequestInfo(request_id=f"r-{i}", state=state, prompt_tokens=5, **fields)


def test_while_any_completion_runs_the_request_is_live_and_unfinished():
    whole = merge(
        "r",
        [
            completion(
                0,
                "finished",
                generated_tokens=4,
                arrival_time=10.0,
                first_token_time=10.5,
                finish_time=12.0,
                finish_reason="length",
                queue_level=0,
                preemptions=1,
            ),
            completion(
                1,
                "preempted",
                generated_tokens=2,
                arrival_time=10.0,
                first_token_time=10.4,
                queue_level=2,
                preemptions=2,
            ),
            completion(2, "queued"),  # not written yet
        ],
    )
    assert (whole.request_id, whole.state, whole.n, whole.prompt_tokens) == ("r", "preempted", 3, 5)
    assert (whole.generated_tokens, whole.preemptions, whole.queue_level) == (6, 3, 0)
    assert (whole.arrival_time, whole.first_token_time, whole.finish_time) == (10.0, 10.4, 0.0)
    assert whole.finish_reason == "" and [c.request_id for c in whole.completions] == ["r-0", "r-1", "r-2"]


def test_once_all_are_final_the_latest_finish_and_every_reason():
    done = [
        completion(0, "finished", finish_time=3.0, finish_reason="stop"),
        completion(1, "cancelled", finish_time=5.0, finish_reason="cancelled"),
    ]
    whole = merge("r", done)
    assert (whole.state, whole.finish_time, whole.finish_reason) == ("finished", 5.0, "stop,cancelled")
    assert merge("r", [*done, completion(2, "failed", finish_reason="error")]).state == "failed"
    assert merge("r", [completion(0, "cancelled"), completion(1, "cancelled")]).state == "cancelled"
    running = merge("r", [completion(0, "swapped"), completion(1, "running"), completion(2, "queued")])
    assert running.state == "running"
