"""Reading request records from Redis the way a client's follow-up would: after they settle.

The scheduler writes a job's final state right after the stream's last message, not before it, so a
test that reads the record the moment its stream ends races that write. These helpers wait for it.
"""

from __future__ import annotations

import time

import redis

from fastserve.store import FINAL_STATES, request_key


def settled_records(redis_url: str, ids: list[str], timeout: float = 60.0) -> dict[str, dict[str, str]]:
    """Each id's record once every one of them is in a final state (or as they are at `timeout`)."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    deadline = time.monotonic() + timeout
    while True:
        records = {rid: client.hgetall(request_key(rid)) for rid in ids}
        if all(r.get("state") in FINAL_STATES for r in records.values()) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)
