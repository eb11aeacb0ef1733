"""Estimated next scheduled time (ENST) of every job, for the KV manager's swap order.

ENST = min(time until starvation promotion, time for the higher-priority work ahead
to drain at the current batch size). Work ahead of a job is what each job before
it in priority order may still run before it yields: the rest of its quantum under
an MLFQ, its remaining tokens otherwise. `by="priority"` replaces the estimate
with the plain priority rank, to compare against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..policy import Job

EnstFn = Callable[[Iterable[Job], float], dict[str, float]]


class EnstEstimator:
    def __init__(
        self,
        max_batch_size: int,
        starvation_threshold: float | None,
        quantum: Callable[[int], float] | None,
        by: str = "enst",
    ) -> None:
        if by not in ("enst", "priority"):
            raise ValueError(f"--swap-order {by!r} is not enst or priority")
        self.max_batch_size = max_batch_size
        self.starvation_threshold = starvation_threshold
        self.quantum = quantum
        self.by = by
        self.iteration_time = 0.0  # moving average of observed iterations, seconds

    def observe(self, elapsed: float) -> None:
        self.iteration_time = (
            elapsed if not self.iteration_time else 0.9 * self.iteration_time + 0.1 * elapsed
        )

    def __call__(self, ordered: Iterable[Job], now: float) -> dict[str, float]:
        estimates: dict[str, float] = {}
        work_ahead = 0.0
        for rank, job in enumerate(ordered):
            if self.by == "priority":
                estimates[job.request_id] = float(rank)
                continue
            drain = work_ahead / self.max_batch_size
            if self.starvation_threshold is not None:
                since = job.last_run_time if job.last_run_time is not None else job.arrival_time
                drain = min(drain, max(self.starvation_threshold - (now - since), 0.0))
            estimates[job.request_id] = drain
            work_ahead += self._remaining_run(job)
        return estimates

    def _remaining_run(self, job: Job) -> float:
        tokens_left = max(job.max_tokens - job.num_generated, 1) * self.iteration_time
        if self.quantum is None:
            return tokens_left
        return min(max(self.quantum(job.level) - job.quantum_used, 0.0), tokens_left)
