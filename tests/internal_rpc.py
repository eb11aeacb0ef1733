"""Tests asking an internal service directly: with the stack's token, as its peers do."""

from __future__ import annotations

import time

import grpc

from fastserve.internal_auth import METADATA_KEY
from fastserve.launcher import Stack
from fastserve.v1 import kvmanager_pb2, kvmanager_pb2_grpc, scheduler_pb2, scheduler_pb2_grpc


def kv_stats(stack: Stack) -> kvmanager_pb2.KVStats:
    """The KV manager's Stats (a read-only call, but internal: it needs the token)."""
    with grpc.insecure_channel(stack.addresses["kvmanager"]) as chan:
        stub = kvmanager_pb2_grpc.KVManagerStub(chan)
        return stub.Stats(kvmanager_pb2.StatsRequest(), metadata=((METADATA_KEY, stack.token),), timeout=10)


def drained_kv_stats(stack: Stack, timeout: float = 60.0) -> kvmanager_pb2.KVStats:
    """The KV manager's Stats once it holds no job (or as they are at `timeout`): a cancelled job's
    KV is freed after its client has gone, not before."""
    deadline = time.monotonic() + timeout
    while (stats := kv_stats(stack)).num_jobs and time.monotonic() < deadline:
        time.sleep(0.05)
    return stats


def scheduler_info(stack: Stack) -> scheduler_pb2.SchedulerInfo:
    """The scheduler's Info: its jobs running and waiting (restored ones parked included)."""
    with grpc.insecure_channel(stack.addresses["scheduler"]) as chan:
        stub = scheduler_pb2_grpc.SchedulerStub(chan)
        return stub.Info(
            scheduler_pb2.SchedulerInfoRequest(), metadata=((METADATA_KEY, stack.token),), timeout=10
        )
