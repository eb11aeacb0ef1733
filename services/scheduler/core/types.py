"""The core's records: a job with its tokens (Seq), a step it launched, a KV plan it was told, events."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import Job

# finish reasons, as the core names them (the Engine maps them to the proto enum)
STOP, LENGTH, CANCELLED, ERROR = "stop", "length", "cancelled", "error"
STATE_OF_REASON = {STOP: "finished", LENGTH: "finished", CANCELLED: "cancelled", ERROR: "failed"}


@dataclass(eq=False)
class Seq:
    """One job as the core owns it: the policy's view plus its tokens and what it holds of the KV."""

    job: Job
    prompt: list[int]
    sampling: object = None  # resolved sampling parameters, opaque to the core
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop tokens end the job only after this many tokens
    stop_token_ids: frozenset[int] = frozenset()
    generated: list[int] = field(default_factory=list)  # tokens back from the workers
    state: str = "queued"  # queued, running, preempted, swapped, finished, cancelled, failed
    finish_reason: str = ""
    error: str = ""
    abort_reason: str = ""  # asked to stop while a step of it was in flight
    in_flight: int = 0  # launched steps not yet complete
    table: list[int] | None = None  # its GPU block table, as the KV manager last said; None: not on the GPU
    on_host: bool = False  # its KV is in the host tier, as the KV manager last said
    swaps_out: int = 0
    recomputes: int = 0
    ever_scheduled: bool = False
    # what the worker ranks hold for it (the live Engine sends only what they lack): how many
    # blocks of `table`, and whether its sampling; reset whenever the table is replaced or lost
    ranks_blocks: int = 0
    ranks_sampling: bool = False

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def finished(self) -> bool:
        return bool(self.finish_reason)

    @property
    def holds_kv(self) -> bool:
        return self.table is not None or self.on_host

    @property
    def pending(self) -> int:
        """Tokens launched but not yet back."""
        return self.job.num_generated - len(self.generated)


@dataclass
class KVPlan:
    """What the KV manager answered for one iteration (only the facts the core keeps).

    `tables[job]` is the job's GPU table from block `offsets.get(job, 0)` on: the blocks before
    are the ones the core already holds for it (the live KV manager sends only what is new)."""

    tables: dict[str, list[int]] = field(default_factory=dict)
    swapped_in: list[str] = field(default_factory=list)
    swapped_out: list[str] = field(default_factory=list)
    recompute: list[str] = field(default_factory=list)
    free_gpu_blocks: int = 0
    free_host_blocks: int = 0
    offsets: dict[str, int] = field(default_factory=dict)


@dataclass
class Proposal:
    """A batch the policy chose; `plan` says whether the KV manager must be asked first."""

    batch: list[Seq]
    plan: bool
    demands: list[tuple[str, int]]  # (job, tokens its KV must cover), in priority order
    waiting: list[tuple[str, float]]  # (idle KV holder, ENST seconds); empty when no swap can happen


@dataclass(slots=True)
class SeqInput:
    """One job's part of a launched step. `token_ids` empty: feed the token the worker kept."""

    seq: Seq
    token_ids: list[int]
    start_pos: int
    sample_index: int
    prefill: bool
    partial: bool = False  # a chunk of the prefill that is not its last: its token is not sampled


@dataclass
class Step:
    """A launched iteration: its jobs in batch order, and what the cost model is told about it."""

    id: int
    inputs: list[SeqInput]
    prefill_tokens: int
    decode_seqs: int
    context_tokens: int
    started: float

    @property
    def seqs(self) -> list[Seq]:
        return [i.seq for i in self.inputs]

    @property
    def tokens_fed(self) -> int:
        return self.prefill_tokens + self.decode_seqs


@dataclass(slots=True)
class Event:
    """Something that happened to a job, for streams, spans, metrics and records.

    kinds: queued, scheduled (first: first time ever), preempted, demoted, promoted,
    swapped_out, swapped_in, recomputed, token (value: the token; first: the first one;
    last: it ended the job; data: what the caller passed along with it, e.g. logprobs),
    finished (seq.finish_reason says why).
    """

    kind: str
    seq: Seq
    value: int = 0
    first: bool = False
    last: bool = False
    data: object = None
    from_level: int = 0
    to_level: int = 0
