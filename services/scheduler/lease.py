"""Jobs restored from Redis wait, parked, for a gateway to come back for them; nobody does: cancelled.

A starting scheduler finds the unfinished jobs of the one before it. It does not run them: a job
whose client left (its gateway died with the scheduler, or the client gave up during the outage)
would be generated for nobody. Each one is parked with a fresh lease instead; a gateway that
re-attaches (Submit with `resume`) claims it and it runs (recomputing its KV). A job nobody claims
within `--orphan-timeout` seconds is cancelled: its record says `cancelled`, it never held KV.

A job with a stream attached holds its lease by the stream itself: when the stream closes without
the job finishing (the gateway or its client went away) the job is aborted at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from fastserve.store import JobLog
from fastserve.v1 import scheduler_pb2 as pb

log = logging.getLogger("fastserve.scheduler.lease")


@dataclass
class Parked:
    """An unfinished job as Redis held it, waiting for its gateway."""

    request: pb.SubmitRequest
    tokens: list[int]
    record: dict[str, object]
    since: float  # monotonic: when its lease started


class Leases:
    def __init__(self, job_log: JobLog, orphan_timeout: float) -> None:
        self.job_log = job_log
        self.orphan_timeout = orphan_timeout
        self.parked: dict[str, Parked] = {}

    def park(self, request: pb.SubmitRequest, tokens: list[int], record: dict[str, object]) -> None:
        self.parked[request.request_id] = Parked(request, tokens, record, time.monotonic())

    def claim(self, request_id: str) -> Parked | None:
        """The parked job, taken out of the lease (a stream is attaching to it), or None."""
        return self.parked.pop(request_id, None)

    def cancel(self, request_id: str, why: str) -> bool:
        """Cancels a parked job: its record says `cancelled`. False when it is not parked."""
        parked = self.parked.pop(request_id, None)
        if parked is None:
            return False
        log.info("%s cancelled: %s", request_id, why)
        self.job_log.update(
            request_id,
            {
                "state": "cancelled",
                "finish_reason": "cancelled",
                "finish_time": time.time(),
                "generated_tokens": len(parked.tokens),
            },
        )
        return True

    def expire(self, now: float | None = None) -> int:
        """Cancels every parked job whose lease ran out; returns how many."""
        now = time.monotonic() if now is None else now
        expired = [rid for rid, p in self.parked.items() if now - p.since >= self.orphan_timeout]
        for request_id in expired:
            self.cancel(
                request_id,
                f"no gateway re-attached within --orphan-timeout {self.orphan_timeout:g}s",
            )
        return len(expired)

    async def run(self) -> None:
        """Expires leases, checking often enough that none outlives its timeout by more than a second."""
        period = min(1.0, max(0.05, self.orphan_timeout / 4))
        while True:
            await asyncio.sleep(period)
            self.expire()
