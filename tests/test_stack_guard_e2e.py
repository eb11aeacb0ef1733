"""Busy ports, internal authentication and malformed messages, on real processes of a shared stack."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest

from fastserve.internal_auth import METADATA_KEY
from fastserve.v1 import kvmanager_pb2, scheduler_pb2, worker_pb2
from tests.reference import collect, greedy
from tests.test_serving_e2e import FR, gateway

# every state-changing internal RPC: (address key, method, request, streaming kind)
STATE_CHANGING = [
    (
        "scheduler",
        "/fastserve.v1.Scheduler/Submit",
        scheduler_pb2.SubmitRequest(request_id="x"),
        "unary_stream",
    ),
    ("scheduler", "/fastserve.v1.Scheduler/Abort", scheduler_pb2.AbortRequest(request_id="x"), "unary_unary"),
    (
        "kvmanager",
        "/fastserve.v1.KVManager/Configure",
        kvmanager_pb2.ConfigureRequest(num_gpu_blocks=1),
        "unary_unary",
    ),
    ("kvmanager", "/fastserve.v1.KVManager/Plan", kvmanager_pb2.PlanRequest(free=["x"]), "stream_stream"),
    ("worker0", "/fastserve.v1.Worker/Step", worker_pb2.StepRequest(step_id=1), "stream_stream"),
]


def call(address: str, method: str, payload: bytes, kind: str, metadata=()) -> None:
    """Sends raw bytes (a message or garbage) and reads the whole answer."""
    with grpc.insecure_channel(address) as chan:
        rpc = getattr(chan, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        if kind == "unary_unary":
            rpc(payload, timeout=10, metadata=metadata)
        elif kind == "unary_stream":
            list(rpc(payload, timeout=10, metadata=metadata))
        else:
            list(rpc(iter([payload]), timeout=10, metadata=metadata))


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
def test_internal_rpcs_refuse_callers_without_the_stack_token(checkpoint_stack, token):
    metadata = () if token is None else ((METADATA_KEY, token),)
    for service, method, request, kind in STATE_CHANGING:
        with pytest.raises(grpc.RpcError) as info:
            call(checkpoint_stack.addresses[service], method, request.SerializeToString(), kind, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, info.value)
    tokens, last = collect(gateway(checkpoint_stack), greedy([2, 42, 43], 4))
    assert len(tokens) == 4 and last.finish_reason == FR.FINISH_REASON_LENGTH


def test_malformed_protobuf_is_invalid_argument_everywhere(checkpoint_stack):
    garbage = b"\xff\xff\xff\xff\x0f"
    metadata = ((METADATA_KEY, checkpoint_stack.token),)
    for service, method, kind in [
        ("kvmanager", "/fastserve.v1.KVManager/Plan", "stream_stream"),
        ("scheduler", "/fastserve.v1.Scheduler/Submit", "unary_stream"),
        ("gateway", "/fastserve.v1.Gateway/Generate", "unary_stream"),
        ("gateway", "/fastserve.v1.Gateway/GetRequest", "unary_unary"),
    ]:
        with pytest.raises(grpc.RpcError) as info:
            call(checkpoint_stack.addresses[service], method, garbage, kind, metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
        assert method in info.value.details()
    tokens, _ = collect(gateway(checkpoint_stack), greedy([2, 42, 43], 3))
    assert len(tokens) == 3


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120)


def test_every_service_and_up_refuse_a_busy_port(checkpoint_stack):
    busy = checkpoint_stack.addresses["gateway"].rsplit(":", 1)[1]  # a real FastServe stack listens there
    sched = checkpoint_stack.addresses["scheduler"]
    for command in [
        ("services.kvmanager", "--port", busy),
        ("services.scheduler", "--port", busy, "--metrics-port", "0"),
        ("services.worker", "--port", busy, "--model", "opt-tiny"),
        ("services.gateway", "--port", busy, "--scheduler-address", sched, "--metrics-port", "0"),
        ("fastserve.cli", "up", "--host", "127.0.0.1", "--port", busy, "--demo", "false"),
    ]:
        done = run(*command)
        assert done.returncode != 0, (command, done.stdout, done.stderr)
        assert busy in done.stderr, (command, done.stderr[-2000:])
