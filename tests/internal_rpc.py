"""Tests asking an internal service directly: with the stack's token, as its peers do."""

from __future__ import annotations

import grpc

from fastserve.internal_auth import METADATA_KEY
from fastserve.launcher import Stack
from fastserve.v1 import kvmanager_pb2, kvmanager_pb2_grpc


def kv_stats(stack: Stack) -> kvmanager_pb2.KVStats:
    """The KV manager's Stats (a read-only call, but internal: it needs the token)."""
    with grpc.insecure_channel(stack.addresses["kvmanager"]) as chan:
        stub = kvmanager_pb2_grpc.KVManagerStub(chan)
        return stub.Stats(kvmanager_pb2.StatsRequest(), metadata=((METADATA_KEY, stack.token),), timeout=10)
