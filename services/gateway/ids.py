"""Request ids scoped to their owner: with API keys on, each key has its own id space.

The stack (scheduler, Redis, kvmanager) knows a request as `{owner}.{id}`, where `owner` is the
fixed-length digest of the caller's key (api_keys.ApiKeys.owner); clients only ever see `{id}`.
So another key's request id can be neither confirmed ("already in flight") nor taken over (the
same id from key B is a different request), in flight or finished, nor can an n > 1 request's
job ids (`{owner}.{id}-{index}`) meet another key's. On an open server (owner '') ids are as sent.
"""

from __future__ import annotations


def scoped(owner: str, request_id: str) -> str:
    return f"{owner}.{request_id}" if owner else request_id


def unscoped(owner: str, key: str) -> str:
    """The id as the owner sent it (the inverse of `scoped`)."""
    return key.removeprefix(f"{owner}.") if owner else key
