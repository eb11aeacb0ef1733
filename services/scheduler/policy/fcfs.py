"""First come, first served with continuous batching: the vLLM / Orca baseline.

A job runs to completion once admitted; new jobs join a running batch at iteration
boundaries when a slot (and KV) is free. Nothing is ever preempted by priority.
"""

from __future__ import annotations

from collections.abc import Iterator

from .base import Job, Policy


class FCFS(Policy):
    name = "fcfs"
    summary = "first come, first served with continuous batching (the vLLM/Orca baseline)"

    def queue_lengths(self) -> dict[int, int]:
        return {0: len(self.jobs)} if self.jobs else {}  # one queue: levels stay 0

    def order(self, now: float) -> Iterator[Job]:
        return iter(self.jobs.values())  # dicts keep insertion order, which is arrival order
