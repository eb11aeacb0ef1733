"""First come, first served with continuous batching: the vLLM / Orca baseline."""

from __future__ import annotations

from .base import Job, Policy


class FCFS(Policy):
    name = "fcfs"

    def order(self, now: float) -> list[Job]:
        # dicts keep insertion order, which is arrival order
        return list(self.jobs.values())
