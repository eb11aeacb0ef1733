"""Request metadata in Redis: one hash `fastserve:req:{id}` per request, with a TTL.

The gateway creates the hash; the scheduler updates it once per iteration in one
pipeline (never once per token). Enough is kept to tell a user what happened to a
request and to resume after a scheduler restart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import redis.asyncio as aioredis

log = logging.getLogger("fastserve.store")

STATES = ("queued", "running", "preempted", "swapped", "finished", "cancelled", "failed")
INT_FIELDS = (
    "prompt_tokens",
    "generated_tokens",
    "queue_level",
    "preemptions",
    "demotions",
    "promotions",
    "swaps_out",
    "recomputes",
)
FLOAT_FIELDS = ("arrival_time", "first_token_time", "finish_time")


def request_key(request_id: str) -> str:
    return f"fastserve:req:{request_id}"


class RequestStore:
    def __init__(self, url: str, ttl_seconds: int) -> None:
        if ttl_seconds < 1:
            raise ValueError(f"--request-ttl must be >= 1 second, got {ttl_seconds}")
        self.url = url
        self.ttl = ttl_seconds
        self.redis = aioredis.from_url(url, decode_responses=True)

    async def ping(self) -> None:
        await self.redis.ping()

    async def write(self, updates: Mapping[str, Mapping[str, object]]) -> None:
        """Writes the fields of many requests in one round trip."""
        if not updates:
            return
        pipe = self.redis.pipeline(transaction=False)
        for request_id, fields in updates.items():
            key = request_key(request_id)
            pipe.hset(key, mapping={k: str(v) for k, v in fields.items()})
            pipe.expire(key, self.ttl)
        await pipe.execute()

    async def read(self, request_id: str) -> dict[str, object] | None:
        raw = await self.redis.hgetall(request_key(request_id))
        if not raw:
            return None
        out: dict[str, object] = dict(raw)
        for name in INT_FIELDS:
            if name in raw:
                out[name] = int(raw[name])
        for name in FLOAT_FIELDS:
            if name in raw:
                out[name] = float(raw[name])
        return out

    async def close(self) -> None:
        await self.redis.aclose()
