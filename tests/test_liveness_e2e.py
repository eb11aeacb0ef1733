"""Liveness, not just health: a frozen process (SIGSTOP) is declared hung after --step-timeout
(NOT_SERVING) and `fastserve up` kills and restarts it, losing no stream; a pause shorter than the
timeout costs nothing (no restart, no recompute).

Real processes under `fastserve up`'s supervisor; numbers are printed (`-s` shows them).
"""

from __future__ import annotations

import os
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.rpc import LIVENESS_SERVICE, check_serving_sync
from fastserve.v1 import common_pb2
from tests.records import settled_records
from tests.reference import PROMPTS, hf_greedy
from tests.test_lease_e2e import TOKENS, start_streams
from tests.test_recovery_e2e import supervised_stack

FR = common_pb2.FinishReason
STEP_TIMEOUT = 6.0


@pytest.fixture(scope="module")
def stack(tiny_checkpoint, tmp_path_factory):
    for prompt in PROMPTS:
        hf_greedy(tiny_checkpoint, tuple(prompt), TOKENS)
    stack = supervised_stack(
        tiny_checkpoint,
        tmp_path_factory.mktemp("liveness-data"),
        *("--max-batch-size", "8", "--num-gpu-blocks", "160", "--step-timeout", str(STEP_TIMEOUT)),
    )
    yield stack
    stack.stop()


def finish_exact(stack, tiny_checkpoint, prefix: str, tokens, finals, threads) -> list[int]:
    """Joins the streams, checks each is exact; returns each job's recompute count from its record."""
    for t in threads:
        t.join(300)
    for i in range(8):
        assert getattr(finals[i], "finish_reason", None) == FR.FINISH_REASON_LENGTH, (i, finals[i])
        assert tokens[i] == hf_greedy(tiny_checkpoint, tuple(PROMPTS[i]), TOKENS), f"stream {i}"
    records = settled_records(stack.addresses["redis"], [f"{prefix}-{i}" for i in range(8)])
    assert [r.get("state") for r in records.values()] == ["finished"] * 8, records
    return [int(r.get("recomputes", 0)) for r in records.values()]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["worker0", "kvmanager"])
def test_a_pause_shorter_than_the_step_timeout_costs_no_restart_and_no_recompute(
    stack, tiny_checkpoint, target
):
    prefix = f"pause-{target}"
    tokens, finals, threads = start_streams(stack, prefix)
    proc = stack.child(target).proc
    os.kill(proc.pid, signal.SIGSTOP)
    time.sleep(STEP_TIMEOUT / 2)
    os.kill(proc.pid, signal.SIGCONT)
    recomputes = finish_exact(stack, tiny_checkpoint, prefix, tokens, finals, threads)
    assert stack.child(target).proc is proc and proc.poll() is None, f"{target} was restarted"
    assert recomputes == [0] * 8
    print(
        f"\n{target} stopped {STEP_TIMEOUT / 2:g}s (--step-timeout {STEP_TIMEOUT:g}): 8/8 exact, 0 recomputes"
    )


@pytest.mark.timeout(300)
def test_a_worker_frozen_past_the_step_timeout_is_declared_hung_and_restarted(stack, tiny_checkpoint):
    tokens, finals, threads = start_streams(stack, "frozen")
    proc = stack.child("worker0").proc
    os.kill(proc.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        while check_serving_sync(stack.addresses["scheduler"]):
            assert time.monotonic() - stopped < STEP_TIMEOUT + 2, "the scheduler still SERVING"
            time.sleep(0.1)
        not_serving = time.monotonic() - stopped
        with grpc.insecure_channel(stack.addresses["scheduler"]) as chan:  # NOT_SERVING, yet alive
            probe = health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE)
            alive = health_pb2_grpc.HealthStub(chan).Check(probe, timeout=10).status
        assert alive == health_pb2.HealthCheckResponse.SERVING
        while stack.child("worker0").proc is proc:
            assert time.monotonic() - stopped < 2 * STEP_TIMEOUT + 5, "worker0 not restarted"
            time.sleep(0.1)
        restarted = time.monotonic() - stopped
        time.sleep(max(0.0, 2 * STEP_TIMEOUT - (time.monotonic() - stopped)))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
    recomputes = finish_exact(stack, tiny_checkpoint, "frozen", tokens, finals, threads)
    assert proc.returncode == -signal.SIGKILL
    print(
        f"\nworker0 frozen {2 * STEP_TIMEOUT:g}s (--step-timeout {STEP_TIMEOUT:g}): NOT_SERVING after "
        f"{not_serving:.2f}s, killed and restarted after {restarted:.2f}s; 8/8 exact; recomputes {recomputes}",
        flush=True,
    )
