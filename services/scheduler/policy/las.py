"""Least attained service: the job that has run least so far runs first.

Attained service is the wall time of the iterations a job ran in, the account an
MLFQ keeps, never reset: LAS is the limit of the MLFQ as the quanta shrink to one
iteration and the queues grow without bound (no starvation rule: a job that waits
attains nothing, so it rises relative to those that run). Ties (e.g. every new job,
at 0) go to the earlier arrival. Knows nothing about output lengths.
"""

from __future__ import annotations

from .base import Job
from .sorted_policy import Key, SortedPolicy


class LAS(SortedPolicy):
    name = "las"
    summary = "least attained service first"

    def __init__(self, config=None, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.attained: dict[str, float] = {}

    def _key(self, job: Job) -> Key:
        return (self.attained.get(job.request_id, 0.0), job.arrival_time, job.request_id)

    def remove(self, request_id: str) -> Job | None:
        self.attained.pop(request_id, None)
        return super().remove(request_id)

    def _account(self, job: Job, elapsed: float) -> None:
        self.attained[job.request_id] = self.attained.get(job.request_id, 0.0) + elapsed
