"""Reading request records the way a client's follow-up would: after they settle.

The scheduler writes a job's final state right after the stream's last message (and after a
cancelled job's KV is freed), not before it, so a test that reads the record the moment its stream
ends races that write. These helpers wait for it, as long as a loaded 2-core machine may need.
"""

from __future__ import annotations

import time

import redis

from fastserve.store import FINAL_STATES, request_key
from fastserve.v1 import gateway_pb2

SETTLE_SECONDS = 60.0  # a final write takes milliseconds; this is for a machine whose cores are busy


def settled_records(
    redis_url: str, ids: list[str], timeout: float = SETTLE_SECONDS
) -> dict[str, dict[str, str]]:
    """Each id's record once every one of them is in a final state (or as they are at `timeout`)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        records = {rid: client.hgetall(request_key(rid)) for rid in ids}
        if all(r.get("state") in FINAL_STATES for r in records.values()) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def settled_info(
    stub, request_id: str, metadata=(), timeout: float = SETTLE_SECONDS
) -> gateway_pb2.RequestInfo:
    """GetRequest through the gateway once the record is in a final state (or as it is at `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        info = stub.GetRequest(
            gateway_pb2.GetRequestRequest(request_id=request_id), metadata=metadata, timeout=30
        )
        if info.state in FINAL_STATES or time.monotonic() > deadline:
            return info
        time.sleep(0.05)
