"""The policy interface shared by the live scheduler and the simulator.

Pure Python on purpose: no torch, grpc or redis. A policy only orders jobs and
keeps their queue accounts; `form_batch` applies the batch limits; the caller
(live iteration loop or discrete-event simulator) runs the batch and reports back.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Job:
    """One request as the policy sees it."""

    request_id: str
    prompt_len: int
    max_tokens: int
    arrival_time: float
    output_len: int | None = None  # true output length; only srpt-oracle may read it
    predicted_len: int | None = None  # predicted output length (the predicted-* policies read it)
    num_generated: int = 0
    needs_prefill: bool = True  # first iteration, or its KV was dropped for recompute
    # with chunked prefill: context tokens whose KV earlier chunks of this (re)prefill computed
    prefilled: int = 0
    chunkable: bool = True  # its prefill may be split over iterations (see BatchLimits.chunked_prefill)
    level: int = 0
    quantum_used: float = 0.0  # wall time run at the current level
    last_run_time: float | None = None  # end of the last iteration it ran in
    preemptions: int = 0
    demotions: int = 0
    promotions: int = 0

    @property
    def context_len(self) -> int:
        return self.prompt_len + self.num_generated

    @property
    def tokens_this_iteration(self) -> int:
        """Tokens the next iteration feeds for this job: on (re)prefill the context its earlier
        chunks did not cover (all of it when unchunked), else one."""
        return self.context_len - self.prefilled if self.needs_prefill else 1


MIN_CHUNK = 16  # the fewest prefill tokens a chunk that does not finish its job's prefill feeds


@dataclass(frozen=True)
class BatchLimits:
    """Per-iteration limits. With `chunked_prefill`, a (re)prefill that does not fit the tokens
    left under `max_batched_tokens` feeds as many as are left (at least MIN_CHUNK) and continues in
    a later iteration, so one long prompt does not make every decode of its iteration wait for
    all of it; without, it waits for an iteration with room for the whole of it."""

    max_batch_size: int = 16
    max_batched_tokens: int = 2048
    chunked_prefill: bool = False


def chunk_tokens(batch: Iterable[Job], limits: BatchLimits) -> list[int]:
    """Tokens each job of a `form_batch` batch feeds this iteration, in batch order: what it needs,
    except the chunk of a prefill cut at the token budget (the batch's last job, if any)."""
    left = limits.max_batched_tokens
    out = []
    for job in batch:
        n = job.tokens_this_iteration
        if cut(job, n, left, limits):
            n = left
        out.append(n)
        left -= n
    return out


def cut(job: Job, need: int, room: int, limits: BatchLimits) -> bool:
    """Whether `job`, needing `need` tokens with `room` left under the budget, runs a chunk of `room`."""
    return limits.chunked_prefill and job.needs_prefill and job.chunkable and MIN_CHUNK <= room < need


@dataclass(frozen=True)
class Transition:
    """A scheduling event for tracing, metrics and Redis: demoted / promoted / preempted."""

    kind: str
    request_id: str
    from_level: int
    to_level: int


class Policy(ABC):
    """Keeps the set of live jobs and orders them; knows nothing about how they run."""

    name: str = "base"
    summary: str = ""  # one line for --help (every registered policy says what it does)

    def __init__(self, config: PolicyConfig | None = None, cost_model: object | None = None) -> None:
        # every policy takes (config, cost model), so make_policy builds them all alike
        self.jobs: dict[str, Job] = {}

    def add(self, job: Job, now: float) -> list[Transition]:
        self.jobs[job.request_id] = job
        return []

    def remove(self, request_id: str) -> Job | None:
        return self.jobs.pop(request_id, None)

    def add_at(self, job: Job, now: float, level: int, account: float) -> list[Transition]:
        """Adds a job that was queued before (restored after a scheduler restart) where it was:
        queue `level`, `account` seconds of that queue's quantum used. Without queues: `add`."""
        return self.add(job, now)

    def completed(self, job: Job) -> None:
        """`job` generated its whole output (finish reason stop or length) and is about to be
        removed; cancelled and failed jobs never come here. Policies that learn lengths listen."""
        return None

    @abstractmethod
    def order(self, now: float) -> Iterable[Job]:
        """Every live job, highest priority first (lazily: callers usually stop after one batch).

        The iterable is one-shot and valid until the policy next changes (add, remove,
        on_iteration_done): consume it, or copy it with list(), before then.
        """

    def on_iteration_done(self, batch: list[Job], elapsed: float, now: float) -> list[Transition]:
        """Account an iteration of `elapsed` seconds that ran `batch`; returns transitions it caused."""
        for job in batch:
            job.last_run_time = now
        return []

    def queue_lengths(self) -> dict[int, int]:
        """Live jobs per queue level (for gauges); policies that keep queues override this cheaply."""
        counts: dict[int, int] = {}
        for job in self.jobs.values():
            counts[job.level] = counts.get(job.level, 0) + 1
        return counts

    def __len__(self) -> int:
        return len(self.jobs)


LOOKAHEAD = 64  # jobs form_batch may pass over for not fitting before it stops looking


def form_batch(
    ordered: Iterable[Job],
    limits: BatchLimits,
    busy: set[str] = frozenset(),  # type: ignore[assignment]
    free_blocks: int | None = None,
    block_size: int = 16,
    blocks_held: dict[str, int] | None = None,
    lookahead: int | None = LOOKAHEAD,
    admit_blocks: int | None = None,
) -> list[Job]:
    """Walk jobs in priority order and take each one that fits every limit.

    `busy` holds jobs already in flight in another pipeline slot. `free_blocks`
    (when given) is the KV budget: a job needs blocks for its whole context (the
    tokens whose KV this iteration reads or writes: the prompt on prefill, the
    prompt and every generated token on decode), minus the `blocks_held` it
    already has on the GPU; the KV manager plans with the same number.

    `admit_blocks` (when given) is what jobs holding no KV (new, or dropped for
    recompute: `needs_prefill`) may claim in total: the blocks free in the tiers
    the KV manager uses. Past it they wait, in priority order (once one does not
    fit, none behind it starts, so a big prompt is not overtaken forever), so
    starting jobs rarely makes the KV manager throw away another job's work; under
    overload an MLFQ would otherwise keep starting arrivals while recomputing the
    jobs it started before. Not never: a job swaps out whole, so a victim bigger
    than the free host space is still dropped. The walk passes over as many
    waiting new jobs as it takes to reach the ones holding KV.

    With `limits.chunked_prefill`, the first (re)prefill that does not fit the tokens left whole
    is set aside; once every job that fits whole is in (in priority order, decodes of lower
    queues included: a chunk never pushes a decode out), it takes the tokens left as a chunk,
    last in the batch, when they are at least MIN_CHUNK (`chunk_tokens` says how many each job
    feeds); KV blocks are still counted for its whole context. There, a prefill larger than the
    whole budget that may not be cut (a job that must prefill whole) runs when it comes first in
    a batch, over the budget, instead of never.

    `ordered` may be a lazy iterable (policies return generators): only as many
    jobs are drawn as it takes to fill the batch, plus at most `lookahead` jobs
    passed over for not fitting the token or KV budget (None: no bound).
    """
    limit = lookahead if lookahead is not None else float("inf")
    batch: list[Job] = []
    tokens = 0
    skipped = 0
    held = blocks_held or {}
    cut_later: Job | None = None  # the first prefill that did not fit whole and may be cut

    def fits_kv(job: Job) -> bool:
        """Whether `job`'s blocks fit the KV budgets; if so they are counted as taken."""
        nonlocal admit_blocks, free_blocks, skipped
        job_blocks = -(-job.context_len // block_size)
        starts = admit_blocks is not None and job.needs_prefill
        if starts and job_blocks > admit_blocks:
            admit_blocks = 0  # the first new job that does not fit keeps its turn: none behind it starts
            return False  # not counted against `lookahead`: the jobs holding KV may all sit below
        if free_blocks is not None:
            need_blocks = job_blocks - held.get(job.request_id, 0)
            if need_blocks > free_blocks:
                skipped += 1
                return False
            free_blocks -= max(need_blocks, 0)
        if starts:
            admit_blocks -= job_blocks
        return True

    for job in ordered:
        if len(batch) >= limits.max_batch_size or tokens >= limits.max_batched_tokens:
            break
        if job.request_id in busy:
            continue
        need_tokens = job.tokens_this_iteration
        if need_tokens > limits.max_batched_tokens - tokens:
            if cut_later is None and cut(job, need_tokens, MIN_CHUNK, limits):
                cut_later = job  # cut to what is left once the jobs that fit whole are in
                continue
            oversize = limits.chunked_prefill and tokens == 0 and need_tokens > limits.max_batched_tokens
            if not oversize:  # (one that may not be cut and never fits: it runs first, alone)
                skipped += 1
                if skipped > limit:  # a long queue of big prompts: stop looking, keep the decision cheap
                    break
                continue
        if not fits_kv(job):
            if skipped > limit:
                break
            continue
        batch.append(job)
        tokens += need_tokens
    room = limits.max_batched_tokens - tokens
    if (
        cut_later is not None
        and len(batch) < limits.max_batch_size
        and room >= MIN_CHUNK
        and fits_kv(cut_later)
    ):
        batch.append(cut_later)
    return batch


# α from the SLO, as the paper asks: a job that has not run for SLO x (mean output tokens)
# seconds has spent a whole average request's latency budget waiting (0.3 s/token x 338
# ShareGPT tokens). The artifact's 3 s promotes most of the backlog every check under
# overload and turns the MLFQ into round-robin (docs/benchmarks.md, "Starvation threshold").
SLO_PER_TOKEN = 0.3
MEAN_OUTPUT_TOKENS = 338
DEFAULT_STARVATION_THRESHOLD = round(SLO_PER_TOKEN * MEAN_OUTPUT_TOKENS)  # 101 s


@dataclass
class PolicyConfig:
    """Every knob of every policy; defaults follow the paper's artifact (DESIGN §8) except α."""

    name: str = "skip-join-mlfq"
    base_quantum: float | None = None  # seconds; None = one profiled decode iteration
    quantum_ratio: float = 2.0
    num_queues: int = 16
    starvation_threshold: float = DEFAULT_STARVATION_THRESHOLD  # α, seconds without running
    starvation_period: int = 1000  # iterations between starvation checks
    extra: dict = field(default_factory=dict)
