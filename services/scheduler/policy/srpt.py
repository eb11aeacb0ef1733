"""Shortest remaining processing time with an oracle: the bound the other policies are measured against."""

from __future__ import annotations

from .base import Job, Policy


def remaining_tokens(job: Job) -> int:
    """Tokens left to generate; the true output length when known, else max_tokens (exact with ignore_eos)."""
    total = job.output_len if job.output_len is not None else job.max_tokens
    return total - job.num_generated


class SRPTOracle(Policy):
    name = "srpt-oracle"

    def __init__(self, config=None, cost_model=None) -> None:
        super().__init__()

    def order(self, now: float) -> list[Job]:
        return sorted(self.jobs.values(), key=lambda j: (remaining_tokens(j), j.arrival_time))
