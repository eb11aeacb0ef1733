"""Multi-Level Feedback Queues: naive (every job joins Q0) and skip-join (FastServe's default).

Queues Q0..Q(n-1) with quanta q_i = base * ratio^i. A job's account is the wall time
of the iterations it ran in; past its queue's quantum it is demoted one level and
the account resets. An unfinished job keeps its place in its queue, so it runs
again next iteration unless higher-priority work arrived: preemption happens at
iteration boundaries. Every `starvation_period` iterations, jobs that have not run
for α seconds are promoted to Q0.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain

from .base import Job, Policy, PolicyConfig, Transition
from .cost_model import CostModel


class MLFQ(Policy):
    name = "mlfq"

    def __init__(self, config: PolicyConfig, cost_model: CostModel | None = None) -> None:
        super().__init__()
        if config.num_queues < 1:
            raise ValueError(f"--num-queues must be >= 1, got {config.num_queues}")
        if config.quantum_ratio < 1:
            raise ValueError(f"--quantum-ratio must be >= 1, got {config.quantum_ratio}")
        self.cost_model = cost_model or CostModel()
        self.base = config.base_quantum if config.base_quantum else self.cost_model.decode_time(1)
        if self.base <= 0:
            raise ValueError(f"--base-quantum must be > 0, got {self.base}")
        self.ratio = config.quantum_ratio
        self.starvation_threshold = config.starvation_threshold
        self.starvation_period = max(config.starvation_period, 1)
        self.queues: list[OrderedDict[str, Job]] = [OrderedDict() for _ in range(config.num_queues)]
        self.iterations = 0

    def quantum(self, level: int) -> float:
        return self.base * self.ratio**level

    def join_level(self, job: Job) -> int:
        return 0

    def add(self, job: Job, now: float) -> list[Transition]:
        super().add(job, now)
        job.level = self.join_level(job)
        job.quantum_used = 0.0
        self.queues[job.level][job.request_id] = job
        return []

    def remove(self, request_id: str) -> Job | None:
        job = super().remove(request_id)
        if job is not None:
            self.queues[job.level].pop(request_id, None)
        return job

    def order(self, now: float) -> Iterator[Job]:
        return chain.from_iterable(q.values() for q in self.queues)

    def _move(self, job: Job, level: int) -> None:
        del self.queues[job.level][job.request_id]
        job.level = level
        job.quantum_used = 0.0
        self.queues[level][job.request_id] = job  # the tail of its new queue

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        self.iterations += 1
        transitions: list[Transition] = []
        last = len(self.queues) - 1
        for job in batch:
            if job.request_id not in self.jobs:  # finished during this iteration
                continue
            job.last_run_time = now
            job.quantum_used += elapsed
            if job.quantum_used >= self.quantum(job.level) and job.level < last:
                old = job.level
                self._move(job, old + 1)
                job.demotions += 1
                transitions.append(Transition("demoted", job.request_id, old, old + 1))
        if self.iterations % self.starvation_period == 0:
            transitions += self._promote_starved(now)
        return transitions

    def _promote_starved(self, now: float) -> list[Transition]:
        starved = [
            job
            for queue in self.queues[1:]
            for job in queue.values()
            if now - (job.last_run_time if job.last_run_time is not None else job.arrival_time)
            >= self.starvation_threshold
        ]
        transitions = []
        for job in starved:
            transitions.append(Transition("promoted", job.request_id, job.level, 0))
            self._move(job, 0)
            job.promotions += 1
        return transitions


class SkipJoinMLFQ(MLFQ):
    """Joins the highest queue whose quantum covers the job's predicted prefill time."""

    name = "skip-join-mlfq"

    def join_level(self, job: Job) -> int:
        prefill = self.cost_model.prefill_time(job.prompt_len)
        for level in range(len(self.queues)):
            if self.quantum(level) >= prefill:
                return level
        return len(self.queues) - 1
