"""Busy ports, internal authentication and malformed messages, on real processes of a shared stack."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha.reflection_pb2 import ServerReflectionRequest

from fastserve.internal_auth import METADATA_KEY
from fastserve.v1 import kvmanager_pb2, scheduler_pb2, worker_pb2
from tests.reference import collect, greedy
from tests.test_serving_e2e import FR, gateway

REFLECTION = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"

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
# the read-only ones need the token too (they tell the model, shapes and load); only health is open
READ_ONLY = [
    ("scheduler", "/fastserve.v1.Scheduler/Info", scheduler_pb2.SchedulerInfoRequest(), "unary_unary"),
    ("kvmanager", "/fastserve.v1.KVManager/Stats", kvmanager_pb2.StatsRequest(), "unary_unary"),
    ("worker0", "/fastserve.v1.Worker/Info", worker_pb2.WorkerInfoRequest(), "unary_unary"),
    *(
        (service, REFLECTION, ServerReflectionRequest(list_services=""), "stream_stream")
        for service in ("scheduler", "kvmanager", "worker0")
    ),
]


def call(address: str, method: str, payload: bytes, kind: str, metadata=()) -> bytes | list[bytes]:
    """Sends raw bytes (a message or garbage) and reads the whole answer."""
    with grpc.insecure_channel(address) as chan:
        rpc = getattr(chan, kind)(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        if kind == "unary_unary":
            return rpc(payload, timeout=10, metadata=metadata)
        if kind == "unary_stream":
            return list(rpc(payload, timeout=10, metadata=metadata))
        return list(rpc(iter([payload]), timeout=10, metadata=metadata))


@pytest.mark.parametrize("token", [None, "not-the-token"], ids=["no-token", "wrong-token"])
def test_internal_rpcs_refuse_callers_without_the_stack_token(checkpoint_stack, token):
    metadata = () if token is None else ((METADATA_KEY, token),)
    for service, method, request, kind in STATE_CHANGING + READ_ONLY:
        with pytest.raises(grpc.RpcError) as info:
            call(checkpoint_stack.addresses[service], method, request.SerializeToString(), kind, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, (method, info.value)
    for service in ("scheduler", "kvmanager", "worker0"):  # health checks hold no secret
        health = health_pb2.HealthCheckRequest().SerializeToString()
        reply = call(
            checkpoint_stack.addresses[service], "/grpc.health.v1.Health/Check", health, "unary_unary"
        )
        assert (
            health_pb2.HealthCheckResponse.FromString(reply).status == health_pb2.HealthCheckResponse.SERVING
        )
    with_token = ((METADATA_KEY, checkpoint_stack.token),)
    for service, method, request, kind in READ_ONLY:  # and answer the stack's token
        call(checkpoint_stack.addresses[service], method, request.SerializeToString(), kind, with_token)
    listing = ServerReflectionRequest(list_services="").SerializeToString()
    call(checkpoint_stack.addresses["gateway"], REFLECTION, listing, "stream_stream")  # public: open
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


def run(*args: str, token: str) -> subprocess.CompletedProcess:
    """A service of the stack (it holds the stack's token, as `fastserve up` gives it)."""
    env = {**os.environ, "FASTSERVE_INTERNAL_TOKEN": token}
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, env=env)


def test_every_service_and_up_refuse_a_busy_port(checkpoint_stack):
    busy = checkpoint_stack.addresses["gateway"].rsplit(":", 1)[1]  # a real FastServe stack listens there
    sched = checkpoint_stack.addresses["scheduler"]
    for command in [
        ("fastserve.services.kvmanager", "--port", busy),
        ("fastserve.services.scheduler", "--port", busy, "--metrics-port", "0"),
        ("fastserve.services.worker", "--port", busy, "--model", "opt-tiny"),
        ("fastserve.services.gateway", "--port", busy, "--scheduler-address", sched, "--metrics-port", "0"),
        ("fastserve.cli", "up", "--host", "127.0.0.1", "--port", busy, "--demo", "false"),
    ]:
        done = run(*command, token=checkpoint_stack.token)  # the gateway asks the scheduler first
        assert done.returncode != 0, (command, done.stdout, done.stderr)
        assert busy in done.stderr, (command, done.stderr[-2000:])


def test_a_gateway_without_the_stack_token_exits_saying_why(checkpoint_stack):
    sched = checkpoint_stack.addresses["scheduler"]
    done = run(
        "fastserve.services.gateway",
        "--port",
        "0",
        "--scheduler-address",
        sched,
        "--metrics-port",
        "0",
        token="wrong",
    )
    assert done.returncode != 0
    assert "refused Info: UNAUTHENTICATED" in done.stderr and "Traceback" not in done.stderr, done.stderr[
        -2000:
    ]
