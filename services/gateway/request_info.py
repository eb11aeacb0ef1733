"""A request as GetRequest and Cancel see it: read from Redis, whichever gateway asks, after any restart.

A request with n = 1 is one job under the request's own id. With n > 1 each completion is a job
`{id}-{index}` whose record names its `parent` and `n`; the request answers as a whole (vLLM and
OpenAI semantics: the client only knows the request's id). Each record carries the `owner` the
scheduler wrote with the job (a digest of the API key that made it).
"""

from __future__ import annotations

from dataclasses import dataclass

from fastserve.store import FINAL_STATES, RequestStore
from fastserve.v1 import gateway_pb2 as pb

INFO_FIELDS = {f.name for f in pb.RequestInfo.DESCRIPTOR.fields} - {"request_id", "n", "completions"}
SUMMED = ("generated_tokens", "preemptions", "demotions", "promotions", "swaps_out", "recomputes")
LIVE_STATES = ("running", "swapped", "preempted", "queued")  # the most advanced first


@dataclass(frozen=True)
class StoredRequest:
    info: pb.RequestInfo
    owner: str  # '' when made on an open server
    job_ids: list[str]


async def read_request(store: RequestStore, request_id: str) -> StoredRequest | None:
    """The request's record (merged over its completions when n > 1), or None; StoreUnavailable
    while Redis cannot be reached."""
    record = await store.read(request_id)
    if record is not None:
        return StoredRequest(info(request_id, record), str(record.get("owner", "")), [request_id])
    first = await store.read(f"{request_id}-0")
    if first is None or first.get("parent") != request_id:
        return None
    job_ids = [f"{request_id}-{i}" for i in range(int(first["n"]))]
    rest = await store.read_many(job_ids[1:])
    completions = [
        info(job_id, record or {"state": "queued"})  # not written yet: the scheduler is taking it on
        for job_id, record in zip(job_ids, [first, *rest], strict=True)
    ]
    return StoredRequest(merge(request_id, completions), str(first.get("owner", "")), job_ids)


def info(job_id: str, record: dict[str, object]) -> pb.RequestInfo:
    return pb.RequestInfo(request_id=job_id, **{k: v for k, v in record.items() if k in INFO_FIELDS})


def merge(request_id: str, completions: list[pb.RequestInfo]) -> pb.RequestInfo:
    """The request as a whole (see RequestInfo.n in gateway.proto for each field's rule)."""
    live = [c for c in completions if c.state not in FINAL_STATES]
    states = {c.state for c in completions}
    if live:
        state = next(s for s in LIVE_STATES if any(c.state == s for c in live))
    else:
        state = "failed" if "failed" in states else "finished" if "finished" in states else "cancelled"
    first_tokens = [c.first_token_time for c in completions if c.first_token_time]
    merged = pb.RequestInfo(
        request_id=request_id,
        state=state,
        prompt_tokens=completions[0].prompt_tokens,
        queue_level=min(c.queue_level for c in live or completions),
        arrival_time=min((c.arrival_time for c in completions if c.arrival_time), default=0.0),
        first_token_time=min(first_tokens, default=0.0),
        finish_time=0.0 if live else max(c.finish_time for c in completions),
        finish_reason="" if live else ",".join(c.finish_reason for c in completions),
        n=len(completions),
        completions=completions,
    )
    for name in SUMMED:
        setattr(merged, name, sum(getattr(c, name) for c in completions))
    return merged
