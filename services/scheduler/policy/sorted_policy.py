"""A policy that keeps its jobs in a sorted list of keys; subclasses say what the key is.

Re-keying a job costs O(log n) to find it plus a memmove, so an iteration costs
O(batch · log n) and order() walks only as far as form_batch draws. Ties go to the
earlier arrival, then the request id.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator

from .base import Job, Policy, Transition

Key = tuple


class SortedPolicy(Policy):
    """Subclasses define `_key(job)` (smaller runs first) and may re-key more jobs in `_rekey_all`."""

    def __init__(self, config=None, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.sorted: list[Key] = []
        self.keys: dict[str, Key] = {}

    def _key(self, job: Job) -> Key:
        raise NotImplementedError

    def _unlink(self, request_id: str) -> None:
        key = self.keys.pop(request_id)
        del self.sorted[bisect_left(self.sorted, key)]

    def _link(self, job: Job) -> None:
        self.keys[job.request_id] = key = self._key(job)
        insort(self.sorted, key)

    def _rekey_all(self) -> None:
        self.keys = {rid: self._key(job) for rid, job in self.jobs.items()}
        self.sorted = sorted(self.keys.values())

    def add(self, job: Job, now: float) -> list[Transition]:
        if job.request_id in self.keys:
            self._unlink(job.request_id)
        super().add(job, now)
        self._link(job)
        return []

    def remove(self, request_id: str) -> Job | None:
        job = super().remove(request_id)
        if job is not None:
            self._unlink(request_id)
        return job

    def queue_lengths(self) -> dict[int, int]:
        return {0: len(self.jobs)} if self.jobs else {}  # one sorted queue: levels stay 0

    def order(self, now: float) -> Iterator[Job]:
        jobs = self.jobs
        return (jobs[key[-1]] for key in self.sorted)

    def _account(self, job: Job, elapsed: float) -> None:
        """Updates what the key reads for a job that just ran (before it is re-keyed)."""

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        for job in batch:
            if job.request_id in self.jobs:  # not finished during this iteration
                job.last_run_time = now
                self._unlink(job.request_id)
                self._account(job, elapsed)
                self._link(job)
        return []
