"""The Gittins index over the output-length distribution, learned online from completed jobs.

A job that has generated `a` tokens and is not done has X > a, X its (unknown) output
length. Its Gittins index is the best rate, over how far ahead one looks, at which
running it buys completions per unit of expected service:

    G(a) = max over d > 0 of  E[w(X) · 1{X <= a + d} | X > a] / E[min(X - a, d) | X > a]

with w(X) = 1 for `gittins` (the policy that minimises mean response time among those
that do not know sizes, in the M/G/1 model) and w(X) = 1/X for `gittins-slowdown`
(mean response time per output token, the paper's metric). The job with the highest
index runs first; ties go to the earlier arrival. For a discrete distribution the
maximum sits at a support point (d = v - a for some observed length v > a), so with
the support sorted, each G(a) is one pass over the lengths above `a`.

Service is counted in tokens (iterations that ran the job: its prefill yields the
first token), not seconds: output lengths are what is learned. The job's max_tokens
is not read: the benchmarks send max_tokens = the true length (ignore_eos), so reading
it would make this an oracle.

The distribution: until 64 jobs have completed, a prior (ShareGPT-like: lognormal,
mean MEAN_OUTPUT_TOKENS = 338, sigma 1, at 256 quantiles); then the lengths of the last
1024 jobs that completed (stop or length; cancelled jobs teach nothing), re-estimated after
64, 128, 256, 512 and 1024 completions and every 1024 after that. These are fixed, not knobs. A job past the longest length held gets the
lowest index (it runs when nothing else waits, oldest first). Indices are computed
lazily, once per (distribution, a), so an iteration usually costs a dictionary lookup per
job that ran plus the re-sort.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import Counter, deque
from statistics import NormalDist

from .base import MEAN_OUTPUT_TOKENS, Job
from .sorted_policy import Key, SortedPolicy

PRIOR_QUANTILES = 256
PRIOR_SIGMA = 1.0
MAX_LEN = 2048
MIN_FINISHED = 64  # finished jobs before the learned distribution replaces the prior
WINDOW = 1024  # finished lengths kept


def prior_lengths(mean: float = MEAN_OUTPUT_TOKENS, sigma: float = PRIOR_SIGMA) -> list[int]:
    """Lognormal quantiles with the given mean, rounded and clipped to [1, MAX_LEN]."""
    mu = math.log(mean) - sigma**2 / 2
    normal = NormalDist(mu, sigma)
    return [
        max(1, min(MAX_LEN, round(math.exp(normal.inv_cdf((i + 0.5) / PRIOR_QUANTILES)))))
        for i in range(PRIOR_QUANTILES)
    ]


class IndexTable:
    """G(a) for one empirical distribution (a multiset of lengths), computed on demand."""

    def __init__(self, lengths: list[int], weighted: bool) -> None:
        counts = Counter(lengths)
        self.values = sorted(counts)
        self.counts = [counts[v] for v in self.values]
        self.rewards = [
            c / v if weighted else float(c) for v, c in zip(self.values, self.counts, strict=True)
        ]
        self.memo: dict[int, float] = {}

    def index(self, attained: int) -> float:
        cached = self.memo.get(attained)
        if cached is not None:
            return cached
        values, counts, rewards = self.values, self.counts, self.rewards
        start = bisect_right(values, attained)  # lengths still possible: v > attained
        if start == len(values):
            best = 0.0
        else:
            tail = sum(counts[start:])  # jobs not done after looking ahead to v (before the loop: all)
            reward = 0.0
            service = 0.0  # sum over finished-by-v of (x - a), and (v - a) for every one still running
            best = 0.0
            prev = attained
            for k in range(start, len(values)):
                v = values[k]
                service += (v - prev) * tail  # everyone still running until v runs v - prev more
                reward += rewards[k]
                tail -= counts[k]
                rate = reward / service
                if rate > best:
                    best = rate
                prev = v
        self.memo[attained] = best
        return best


class Gittins(SortedPolicy):
    name = "gittins"
    summary = "Gittins index over the output-length distribution learned from completed jobs"
    weighted = False

    def __init__(self, config=None, cost_model=None) -> None:
        super().__init__(config, cost_model)
        self.finished: deque[int] = deque(maxlen=WINDOW)
        self.num_finished = 0
        self.next_refresh = MIN_FINISHED
        self.table = IndexTable(prior_lengths(), self.weighted)

    def _key(self, job: Job) -> Key:
        return (-self.table.index(job.num_generated), job.arrival_time, job.request_id)

    def completed(self, job: Job) -> None:
        """Only a completed job's length is a sample of the distribution: a cancelled one's is
        where the client gave up, which would teach that jobs end early."""
        self.finished.append(job.num_generated)
        self.num_finished += 1
        if self.num_finished >= self.next_refresh:
            self.next_refresh += min(self.next_refresh, WINDOW)
            self.table = IndexTable(list(self.finished), self.weighted)
            self._rekey_all()


class GittinsSlowdown(Gittins):
    """Each job weighted by 1 / its output length: optimises latency per output token."""

    name = "gittins-slowdown"
    summary = "Gittins index weighted by 1 / output length (optimises latency per token)"
    weighted = True
