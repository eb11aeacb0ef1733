"""Shortest remaining processing time with an oracle: the bound the other policies are measured against.

A job's remaining work is the number of iterations it still needs, i.e. the tokens
it has left to generate (one a decode iteration; the prefill iteration yields the
first). It is exact under ignore_eos with max_tokens = the true output length,
which is how the benchmarks send requests. Ties go to the earlier arrival.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator

from .base import Job, Policy, PolicyConfig, Transition


def remaining_tokens(job: Job) -> int:
    """Tokens left to generate; the true output length when known, else max_tokens (exact with ignore_eos)."""
    total = job.output_len if job.output_len is not None else job.max_tokens
    return total - job.num_generated


Key = tuple[int, float, str]


class SRPTOracle(Policy):
    """Keeps jobs sorted by (remaining tokens, arrival); only the jobs that ran move each iteration.

    A sorted list with bisection: re-keying a job that ran costs O(log n) to find it
    plus a memmove, so an iteration costs O(batch · log n) and order() walks only as
    far as form_batch draws.
    """

    name = "srpt-oracle"

    def __init__(self, config: PolicyConfig | None = None, cost_model: object | None = None) -> None:
        super().__init__(config, cost_model)
        self.sorted: list[Key] = []
        self.keys: dict[str, Key] = {}

    @staticmethod
    def _key(job: Job) -> Key:
        return (remaining_tokens(job), job.arrival_time, job.request_id)

    def _unlink(self, request_id: str) -> None:
        key = self.keys.pop(request_id)
        del self.sorted[bisect_left(self.sorted, key)]

    def _link(self, job: Job) -> None:
        self.keys[job.request_id] = key = self._key(job)
        insort(self.sorted, key)

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

    def order(self, now: float) -> Iterator[Job]:
        jobs = self.jobs
        return (jobs[rid] for _, _, rid in self.sorted)

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        for job in batch:
            if job.request_id in self.jobs:  # not finished during this iteration
                job.last_run_time = now
                self._unlink(job.request_id)
                self._link(job)
        return []
