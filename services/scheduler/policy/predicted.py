"""Policies that use a predicted output length (`Job.predicted_len`), never the true one.

The prediction comes with the job: the live scheduler's length predictor
(services/scheduler/length_predictor.py) reads the prompt's token ids, the simulator reads it
from the trace. A job without one is refused: falling back to max_tokens would make these
oracles in the benchmarks, which send max_tokens = the true length.

- `predicted-srpt`: fewest predicted remaining tokens first (prediction - generated, at
  least 1), with MLFQ's starvation guard (below).
- `predicted-gittins`: the Gittins index (gittins.py, weighted by 1/length: latency per
  token) over a lognormal centred on the job's prediction, with the predictor's own log-error
  spread sigma (`PolicyConfig.extra["prediction_sigma"]`), at 32 quantiles. A job that outruns
  its distribution gets the lowest index; the starvation guard lifts it.
- `predicted-skip-join-mlfq`: FastServe's MLFQ, but a job joins the queue in which a job of its
  predicted length would finish (the first level whose cumulative quanta cover its prefill and
  one decode iteration per further predicted token), never above its skip-join level.
- `predicted-order-mlfq`: skip-join MLFQ whose queues are each ordered by predicted remaining
  tokens instead of arrival.

The starvation guard of the sorted policies is MLFQ's: every `starvation_period` iterations
a job that has not run for α seconds is promoted above every unpromoted job for one Q0
quantum of running (one decode iteration by default), as MLFQ puts it at the tail of Q0.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterator
from itertools import chain
from statistics import NormalDist

from .base import Job, PolicyConfig, Transition
from .cost_model import CostModel
from .gittins import IndexTable
from .mlfq import SkipJoinMLFQ
from .sorted_policy import Key, SortedPolicy
from .starvation import starvation_threshold, starved

DEFAULT_SIGMA = 0.8  # log-error spread when the predictor does not say (about the ShareGPT model's)
QUANTILES = 32


def predicted(job: Job, policy: str) -> int:
    if job.predicted_len is None:
        raise ValueError(
            f"--policy {policy} needs a predicted output length for request {job.request_id!r}: "
            "start the scheduler with --length-predictor, or give the simulator a trace with predicted_len"
        )
    return job.predicted_len


def predicted_remaining(job: Job) -> int:
    """Predicted tokens left to generate, at least 1 (a job past its prediction is 'nearly done')."""
    return max((job.predicted_len or 0) - job.num_generated, 1)


class GuardedSortedPolicy(SortedPolicy):
    """A sorted policy with MLFQ's starvation guard; subclasses rank by `_rank(job)` (smaller first)."""

    def __init__(self, config: PolicyConfig | None = None, cost_model: CostModel | None = None) -> None:
        super().__init__(config, cost_model)
        config = config or PolicyConfig(name=self.name)
        self.boost_quantum = config.base_quantum or (cost_model or CostModel()).decode_time(1)
        self.starvation_threshold = starvation_threshold(config)
        self.starvation_period = max(config.starvation_period, 1)
        self.sigma = float(config.extra.get("prediction_sigma", DEFAULT_SIGMA))
        self.idle: OrderedDict[str, Job] = OrderedDict()  # by when each last ran (or arrived)
        self.boost: dict[str, float] = {}  # promoted jobs: seconds of top priority left
        self.iterations = 0

    def _rank(self, job: Job) -> tuple:
        raise NotImplementedError

    def _key(self, job: Job) -> Key:
        return (0 if job.request_id in self.boost else 1, *self._rank(job), job.arrival_time, job.request_id)

    def add(self, job: Job, now: float) -> list[Transition]:
        predicted(job, self.name)
        transitions = super().add(job, now)
        self.idle[job.request_id] = job
        return transitions

    def remove(self, request_id: str) -> Job | None:
        self.idle.pop(request_id, None)
        self.boost.pop(request_id, None)
        return super().remove(request_id)

    def _account(self, job: Job, elapsed: float) -> None:
        rid = job.request_id
        self.idle.move_to_end(rid)
        if rid in self.boost:
            self.boost[rid] -= elapsed
            if self.boost[rid] <= 0:
                del self.boost[rid]

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        super().on_iteration_done(batch, elapsed, now)
        self.iterations += 1
        if self.iterations % self.starvation_period:
            return []
        transitions = []
        for job in starved(self.idle.values(), now, self.starvation_threshold):
            rid = job.request_id
            if rid in self.boost:
                continue
            self._unlink(rid)
            self.boost[rid] = self.boost_quantum
            job.promotions += 1
            self._link(job)
            transitions.append(Transition("promoted", rid, 1, 0))
        return transitions


class PredictedSRPT(GuardedSortedPolicy):
    name = "predicted-srpt"
    summary = "fewest predicted remaining tokens first (needs --length-predictor), MLFQ's starvation guard"

    def _rank(self, job: Job) -> tuple:
        return (predicted_remaining(job),)


def lognormal_quantiles(sigma: float, count: int = QUANTILES) -> list[float]:
    """exp(sigma z) at the mid-quantiles of a standard normal: a lognormal of median 1."""
    normal = NormalDist()
    return [math.exp(sigma * normal.inv_cdf((k + 0.5) / count)) for k in range(count)]


class PredictedGittins(GuardedSortedPolicy):
    name = "predicted-gittins"
    summary = (
        "Gittins index (per-token weighting) over a lognormal around each job's predicted length "
        "(needs --length-predictor)"
    )

    def __init__(self, config: PolicyConfig | None = None, cost_model: CostModel | None = None) -> None:
        super().__init__(config, cost_model)
        self.shape = lognormal_quantiles(self.sigma)
        self.tables: dict[int, IndexTable] = {}  # one per predicted length (the support scales with it)

    def table(self, prediction: int) -> IndexTable:
        table = self.tables.get(prediction)
        if table is None:
            lengths = [max(1, round(prediction * s)) for s in self.shape]
            table = self.tables[prediction] = IndexTable(lengths, weighted=True)
        return table

    def _rank(self, job: Job) -> tuple:
        return (-self.table(job.predicted_len or 1).index(job.num_generated),)


class PredictedSkipJoinMLFQ(SkipJoinMLFQ):
    name = "predicted-skip-join-mlfq"
    summary = "MLFQ entered at the level where a job of the predicted length would finish (needs --length-predictor)"

    def join_level(self, job: Job) -> int:
        # the prefill iteration yields the first token; each further token is about one decode iteration
        service = (
            self.cost_model.prefill_time(job.prompt_len) + max(predicted(job, self.name) - 1, 0) * self.base
        )
        cumulative = 0.0
        for level, quantum in enumerate(self.quanta):
            cumulative += quantum
            if cumulative >= service:
                return max(level, super().join_level(job))
        return len(self.quanta) - 1


class PredictedOrderMLFQ(SkipJoinMLFQ):
    name = "predicted-order-mlfq"
    summary = "skip-join MLFQ, each queue ordered by predicted remaining tokens (needs --length-predictor)"

    def add_at(self, job: Job, now: float, level: int, account: float) -> list[Transition]:
        predicted(job, self.name)
        return super().add_at(job, now, level, account)

    def order(self, now: float) -> Iterator[Job]:
        """Each queue sorted when reached: O(q log q) for the queues a batch draws from."""
        key = lambda j: (predicted_remaining(j), j.arrival_time, j.request_id)  # noqa: E731
        return chain.from_iterable(sorted(q.values(), key=key) for q in self.queues if q)
