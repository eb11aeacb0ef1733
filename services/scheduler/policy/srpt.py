"""Shortest remaining processing time with an oracle: the bound the other policies are measured against.

A job's remaining work is the number of iterations it still needs, i.e. the tokens
it has left to generate (one a decode iteration; the prefill iteration yields the
first). It is exact under ignore_eos with max_tokens = the true output length,
which is how the benchmarks send requests. Ties go to the earlier arrival.
"""

from __future__ import annotations

from .base import Job
from .sorted_policy import Key, SortedPolicy


def remaining_tokens(job: Job) -> int:
    """Tokens left to generate; the true output length when known, else max_tokens (exact with ignore_eos)."""
    total = job.output_len if job.output_len is not None else job.max_tokens
    return total - job.num_generated


class SRPTOracle(SortedPolicy):
    """Keeps jobs sorted by (remaining tokens, arrival); only the jobs that ran move each iteration."""

    name = "srpt-oracle"
    summary = "shortest remaining output first, told every output length (a lower bound)"

    def _key(self, job: Job) -> Key:
        return (remaining_tokens(job), job.arrival_time, job.request_id)
