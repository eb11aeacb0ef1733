"""Shortest remaining processing time with an oracle: the bound the other policies are measured against."""

from __future__ import annotations

from bisect import insort
from collections.abc import Iterator

from .base import Job, Policy, Transition


def remaining_tokens(job: Job) -> int:
    """Tokens left to generate; the true output length when known, else max_tokens (exact with ignore_eos)."""
    total = job.output_len if job.output_len is not None else job.max_tokens
    return total - job.num_generated


class SRPTOracle(Policy):
    """Keeps jobs sorted by (remaining tokens, arrival); only the jobs that ran move each iteration."""

    name = "srpt-oracle"

    def __init__(self, config=None, cost_model=None) -> None:
        super().__init__()
        self.sorted: list[tuple[int, float, str]] = []
        self.keys: dict[str, tuple[int, float, str]] = {}

    def _key(self, job: Job) -> tuple[int, float, str]:
        return (remaining_tokens(job), job.arrival_time, job.request_id)

    def add(self, job: Job, now: float) -> list[Transition]:
        super().add(job, now)
        self.keys[job.request_id] = key = self._key(job)
        insort(self.sorted, key)
        return []

    def remove(self, request_id: str) -> Job | None:
        job = super().remove(request_id)
        if job is not None:
            self.sorted.remove(self.keys.pop(request_id))
        return job

    def order(self, now: float) -> Iterator[Job]:
        return (self.jobs[rid] for _, _, rid in self.sorted)

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        for job in batch:
            if job.request_id in self.jobs:
                job.last_run_time = now
                self.sorted.remove(self.keys[job.request_id])
                self.keys[job.request_id] = key = self._key(job)
                insort(self.sorted, key)
        return []
