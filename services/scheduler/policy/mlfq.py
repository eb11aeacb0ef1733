"""Multi-Level Feedback Queues: naive (every job joins Q0) and skip-join (FastServe's default).

Queues Q0..Q(n-1) with quanta q_i = base * ratio^i. A job's account is the wall time
of the iterations it ran in; past its queue's quantum it is demoted one level (to
the tail of the next queue) and the account resets. An unfinished job that was
not demoted keeps its place at the head end of its queue, so it runs again next
iteration unless higher-priority work arrived: preemption happens at iteration
boundaries. Every `starvation_period` iterations, jobs that have not run for α
seconds (since their last iteration, or their arrival if they never ran) are
promoted to the tail of Q0 with a fresh account.

Costs per iteration: order() is a lazy walk over the queues from Q0 down, so
forming a batch touches about as many jobs as the batch holds; the accounting
touches only the jobs that ran; the starvation check walks only the jobs it
promotes (jobs are kept in order of when they last ran).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain

from .base import Job, Policy, PolicyConfig, Transition
from .cost_model import CostModel
from .starvation import starvation_threshold, starved


class MLFQ(Policy):
    name = "mlfq"
    summary = "naive MLFQ: every job joins Q0"

    def __init__(self, config: PolicyConfig | None = None, cost_model: CostModel | None = None) -> None:
        config = config or PolicyConfig(name=self.name)
        super().__init__(config, cost_model)
        if config.num_queues < 1:
            raise ValueError(f"--num-queues must be >= 1, got {config.num_queues}")
        if config.quantum_ratio < 1:
            raise ValueError(f"--quantum-ratio must be >= 1, got {config.quantum_ratio}")
        self.cost_model = cost_model or CostModel()
        self.base = config.base_quantum if config.base_quantum else self.cost_model.decode_time(1)
        if self.base <= 0:
            raise ValueError(f"--base-quantum must be > 0, got {self.base}")
        self.ratio = config.quantum_ratio
        self.quanta = [self.base * self.ratio**i for i in range(config.num_queues)]
        self.starvation_threshold = starvation_threshold(config)
        self.starvation_period = max(config.starvation_period, 1)
        self.queues: list[OrderedDict[str, Job]] = [OrderedDict() for _ in range(config.num_queues)]
        # every live job, ordered by when it last ran (or arrived): the starved ones are a prefix
        self.idle: OrderedDict[str, Job] = OrderedDict()
        self.iterations = 0

    def quantum(self, level: int) -> float:
        return self.quanta[level]

    def join_level(self, job: Job) -> int:
        return 0

    def add(self, job: Job, now: float) -> list[Transition]:
        return self.add_at(job, now, self.join_level(job), 0.0)

    def add_at(self, job: Job, now: float, level: int, account: float) -> list[Transition]:
        """At `level` (clamped to the queues there are: --num-queues may have changed) with
        `account` seconds of its quantum used."""
        if job.request_id in self.jobs:
            self.remove(job.request_id)
        super().add(job, now)
        job.level = min(max(level, 0), len(self.queues) - 1)
        job.quantum_used = max(account, 0.0)
        self.queues[job.level][job.request_id] = job
        self.idle[job.request_id] = job
        return []

    def remove(self, request_id: str) -> Job | None:
        job = super().remove(request_id)
        if job is not None:
            self.queues[job.level].pop(request_id, None)
            self.idle.pop(request_id, None)
        return job

    def queue_lengths(self) -> dict[int, int]:
        return {level: len(q) for level, q in enumerate(self.queues) if q}

    def order(self, now: float) -> Iterator[Job]:
        return chain.from_iterable(q.values() for q in self.queues if q)

    def _move(self, job: Job, level: int) -> None:
        del self.queues[job.level][job.request_id]
        job.level = level
        job.quantum_used = 0.0
        self.queues[level][job.request_id] = job  # the tail of its new queue

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        self.iterations += 1
        transitions: list[Transition] = []
        last = len(self.queues) - 1
        jobs, idle = self.jobs, self.idle
        for job in batch:
            rid = job.request_id
            if rid not in jobs:  # finished during this iteration
                continue
            job.last_run_time = now
            idle.move_to_end(rid)
            job.quantum_used += elapsed
            if job.level < last and job.quantum_used >= self.quanta[job.level]:
                old = job.level
                self._move(job, old + 1)
                job.demotions += 1
                transitions.append(Transition("demoted", rid, old, old + 1))
        if self.iterations % self.starvation_period == 0:
            transitions += self.promote_starved(now)
        return transitions

    def promote_starved(self, now: float) -> list[Transition]:
        transitions = []
        for job in starved(self.idle.values(), now, self.starvation_threshold):
            if job.level == 0:
                continue
            transitions.append(Transition("promoted", job.request_id, job.level, 0))
            self._move(job, 0)
            job.promotions += 1
        return transitions


class SkipJoinMLFQ(MLFQ):
    """Joins the highest queue whose quantum covers the job's predicted prefill time.

    p = min{ i : q_i >= t_prefill(prompt_len) }, the last queue when no quantum does.
    A job that would otherwise burn through Q0..Q(p-1) in its single prefill iteration
    (demoted each time, overtaking shorter jobs' decode turns) starts where it belongs.
    """

    name = "skip-join-mlfq"
    summary = "FastServe's MLFQ: a job joins the highest queue whose quantum covers its prefill"

    def join_level(self, job: Job) -> int:
        prefill = self.cost_model.prefill_time(job.prompt_len)
        for level, quantum in enumerate(self.quanta):
            if quantum >= prefill:
                return level
        return len(self.quanta) - 1
