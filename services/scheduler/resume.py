"""Jobs that outlive a scheduler: taken on with their durable record, parked after a restart,
and re-attached to a gateway that comes back for them.

A job's spec (the SubmitRequest) goes to Redis when the scheduler takes it on; its tokens follow
once per iteration (fastserve.store.JobLog). A starting scheduler parks every unfinished job with
the tokens Redis holds (lease.py: it runs only once a gateway claims it, and is cancelled when none
does within --orphan-timeout); its KV is gone, so its first iteration recomputes prompt + tokens.
A gateway re-attaches with `resume` and the tokens its client already has; the stream then opens
with a message whose `first_index` says where its tokens start.
"""

from __future__ import annotations

import logging

from google.protobuf.message import DecodeError

from fastserve.store import JobLog, RequestStore
from fastserve.v1 import common_pb2
from fastserve.v1 import scheduler_pb2 as pb

from .engine import Engine, LiveJob
from .lease import Leases, Parked

log = logging.getLogger("fastserve.scheduler.resume")
FR = common_pb2.FinishReason


def ended(request: pb.SubmitRequest, tokens: list[int], eos_token_id: int) -> int:
    """The finish reason of a job that already has `tokens` (as the engine decides it), or 0."""
    sampling = request.sampling
    if tokens and len(tokens) > sampling.min_tokens:
        if tokens[-1] == eos_token_id and not sampling.ignore_eos:
            return FR.FINISH_REASON_STOP
        if tokens[-1] in sampling.stop_token_ids:
            return FR.FINISH_REASON_STOP
    if len(tokens) >= sampling.max_tokens:
        return FR.FINISH_REASON_LENGTH
    return FR.FINISH_REASON_UNSPECIFIED


def take_on(
    engine: Engine, job_log: JobLog, request: pb.SubmitRequest, tokens: list[int], record: dict | None = None
) -> LiveJob:
    """Queues the job (with the tokens it already has) and writes its durable record. A job restored
    from its `record` goes back to the queue level and account it had, with its counters."""
    record = record or {}
    queue = (
        (int(record["queue_level"]), float(record.get("queue_account") or 0.0))
        if "queue_level" in record
        else None
    )
    predicted = record.get("predicted_len")  # as first predicted: a restart does not re-predict
    live = engine.submit(request, list(tokens), queue, int(predicted) if predicted else None)
    job = live.seq.job
    job.preemptions, job.demotions, job.promotions = (
        int(record.get(name) or 0) for name in ("preemptions", "demotions", "promotions")
    )
    live.seq.swaps_out = int(record.get("swaps_out") or 0)
    if tokens:
        live.first_token_time = float(record.get("first_token_time") or 0.0)
    live.seq.recomputes = int(record.get("recomputes") or 0) + (1 if tokens else 0)
    job_log.begin(
        request.request_id,
        request.SerializeToString(),
        {
            "arrival_time": request.arrival_time,
            "max_tokens": request.sampling.max_tokens,
            **owner_fields(request),
            **live.record(),
        },
    )
    job_log.update(request.request_id, {}, live.seq.generated)
    return live


def owner_fields(request: pb.SubmitRequest) -> dict[str, object]:
    """Who made the job and, for a completion of a request with n > 1, which request: what the
    gateway's GetRequest and Cancel read from the record (fastserve/store.py)."""
    fields: dict[str, object] = {"owner": request.owner} if request.owner else {}
    if request.parent_request_id:
        fields.update(parent=request.parent_request_id, n=request.n)
    return fields


def attach(engine: Engine, live: LiveJob, tokens: list[int]) -> pb.SubmitResponse:
    """Re-attaches a stream to a job still in this scheduler; the opening message replays what the
    client lacks, or says where the next token's index starts. A job restored from Redis may hold
    fewer tokens than the client already has (Redis is written after tokens are streamed): while it
    waits to recompute, it takes the client's."""
    live.outbox = type(live.outbox)()
    live.pending = None  # the opening message replays these too
    seq = live.seq
    if len(tokens) > len(seq.generated) and seq.job.needs_prefill and not seq.in_flight:
        seq.generated.extend(tokens[len(seq.generated) :])  # in place: the job log holds this list
        seq.job.num_generated = len(seq.generated)
        reason = ended(live.request, seq.generated, engine.core.config.eos_token_id)
        if reason:
            engine.abort(live.request_id, reason)  # its final message follows on the new outbox
    start = min(len(tokens), len(seq.generated))
    return pb.SubmitResponse(token_ids=seq.generated[start:], first_index=start)


def final_message(request: pb.SubmitRequest, tokens: list[int], reason: int) -> pb.SubmitResponse:
    return pb.SubmitResponse(
        first_index=len(tokens),
        finish_reason=reason,
        prompt_tokens=len(request.prompt_token_ids),
        completion_tokens=len(tokens),
    )


def record_ended(job_log: JobLog, request_id: str, tokens: list[int], reason: int) -> None:
    """The record of a job that had all its tokens when its final state was lost."""
    job_log.update(
        request_id,
        {
            "state": "finished",
            "finish_reason": FR.Name(reason).removeprefix("FINISH_REASON_").lower(),
            "generated_tokens": len(tokens),
        },
    )


def claim(
    engine: Engine, job_log: JobLog, parked: Parked, request: pb.SubmitRequest, tokens: list[int]
) -> tuple[LiveJob, pb.SubmitResponse]:
    """Takes on a parked job a gateway re-attached to, with whichever of its tokens and the client's
    are further along (both are prefixes of the same output); the opening message replays what the
    client lacks."""
    have = parked.tokens if len(parked.tokens) > len(tokens) else tokens
    live = take_on(engine, job_log, request, have, parked.record)
    return live, pb.SubmitResponse(token_ids=have[len(tokens) :], first_index=len(tokens))


async def restore(engine: Engine, job_log: JobLog, store: RequestStore, leases: Leases) -> int:
    """Parks every unfinished job Redis holds, each with a fresh lease; returns how many."""
    count = 0
    for saved in await store.unfinished():
        try:
            request = pb.SubmitRequest.FromString(saved.spec)
        except DecodeError:  # not a job this scheduler can rebuild: say so and serve the rest
            log.error(
                "%s: its saved spec in Redis does not parse; left out (marked failed)", saved.request_id
            )
            job_log.update(saved.request_id, {"state": "failed", "finish_reason": "error"})
            continue
        reason = ended(request, saved.tokens, engine.core.config.eos_token_id)
        if reason:  # finished, but the final state did not reach Redis before the restart
            record_ended(job_log, saved.request_id, saved.tokens, reason)
            continue
        leases.park(request, saved.tokens, saved.fields)
        count += 1
    return count
