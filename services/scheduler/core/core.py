"""The scheduling core: one iteration loop's decisions, driven alike by the live Engine and the simulator.

Pure Python (no grpc, torch or redis). It owns the job set, each job's tokens, the
policy, and the only KV facts the scheduler keeps: what the KV manager's last answers
said (free block counts, which jobs hold blocks in which tier, the GPU tables of the
jobs it scheduled). Per iteration the caller

1. `schedule(now)`: the policy's batch, and whether the KV manager must be asked: only
   when a job needs blocks it does not hold, or a swap may be due (proactive reserve
   short, or jobs on the host to prefetch). Only then are ENST hints computed;
2. asks the KV manager when `proposal.plan` (live: a stream to the kvmanager service;
   simulator: the planner in-process), then `launch(proposal, plan, now)`: the step to run;
3. `complete(step, tokens, elapsed, now)` when the step's tokens are back.

What happened (queued, scheduled, preempted, demoted, token, finished, ...) comes out of
`take_events()`; finished jobs whose blocks the KV manager should free, out of `take_frees()`.

Cost per iteration: the batch plus what changed, never the number of queued jobs (the
policy's order is drawn lazily; ENST, which walks the order, runs only when a swap may
be needed).

With `overlap` (no pipeline parallelism), a job whose step is in flight may be scheduled
again as a decode: its context counts the token still in flight (a job's `num_generated`
counts launched tokens), the step feeds no token (the worker keeps each job's last
sampled one), and a token that comes back for a job that already finished is dropped.
"""

from __future__ import annotations

from ..policy import Job, Policy, Transition, chunk_tokens, form_batch
from .config import CoreConfig
from .enst import EnstEstimator
from .types import (
    CANCELLED,
    ERROR,
    LENGTH,
    STATE_OF_REASON,
    STOP,
    Event,
    KVPlan,
    Proposal,
    Seq,
    SeqInput,
    Step,
)

GROW_AHEAD = 1  # blocks a job is given beyond its context when the KV manager is asked anyway (see _grown)


class _Busy:
    """form_batch's `busy`: jobs that may not run in the next step (one in flight, and not overlappable)."""

    def __init__(self, core: SchedulerCore) -> None:
        self.core = core

    def __contains__(self, request_id: str) -> bool:
        seq = self.core.seqs.get(request_id)
        return seq is not None and not self.core.can_launch(seq)


class _Held:
    """form_batch's `blocks_held`: GPU blocks a job holds, as the KV manager said."""

    def __init__(self, seqs: dict[str, Seq]) -> None:
        self.seqs = seqs

    def get(self, request_id: str, default: int = 0) -> int:
        seq = self.seqs.get(request_id)
        return len(seq.table) if seq is not None and seq.table is not None else default


class SchedulerCore:
    def __init__(self, config: CoreConfig, policy: Policy, enst: EnstEstimator | None = None) -> None:
        self.config = config
        self.policy = policy
        self.enst = enst or EnstEstimator(
            config.limits.max_batch_size,
            getattr(policy, "starvation_threshold", None),
            getattr(policy, "quantum", None),
        )
        self.seqs: dict[str, Seq] = {}
        self.free_gpu = config.num_gpu_blocks  # as the KV manager last said
        self.free_host = config.host_blocks
        self.num_on_host = 0
        self.flying: set[str] = set()  # jobs with a step in flight
        self.running: set[str] = set()  # jobs of the last launched step and those in flight then
        self.steps = 0
        self._events: list[Event] = []
        self._frees: list[str] = []
        self._busy = _Busy(self)
        self._held = _Held(self.seqs)

    # -- jobs in and out ---------------------------------------------------------------------

    def add(
        self,
        request_id: str,
        prompt: list[int],
        max_tokens: int,
        now: float,
        *,
        sampling: object = None,
        ignore_eos: bool = False,
        min_tokens: int = 0,
        stop_token_ids: frozenset[int] = frozenset(),
        output_len: int | None = None,
        predicted_len: int | None = None,
        arrival_time: float | None = None,
        generated: list[int] | None = None,
        queue: tuple[int, float] | None = None,
        chunkable: bool = True,
    ) -> Seq:
        """A new job; with `generated`, a job restored with the tokens it had (it recomputes its KV),
        and with `queue`, the (level, account) it had in the policy's queues; `chunkable` False: its
        prefill always runs whole (the worker needs all of its prompt in one step)."""
        job = Job(
            request_id=request_id,
            prompt_len=len(prompt),
            max_tokens=max_tokens,
            arrival_time=now if arrival_time is None else arrival_time,
            output_len=output_len,
            predicted_len=predicted_len,
            num_generated=len(generated or ()),
            chunkable=chunkable,
        )
        seq = Seq(job, list(prompt), sampling, ignore_eos, min_tokens, stop_token_ids, list(generated or ()))
        self.seqs[request_id] = seq
        placed = self.policy.add(job, now) if queue is None else self.policy.add_at(job, now, *queue)
        self._transitions(placed)
        self._events.append(Event("queued", seq))
        return seq

    def abort(self, request_id: str, reason: str = CANCELLED) -> bool:
        """Stops a job now, or when its step in flight comes back. False if it is not live."""
        seq = self.seqs.get(request_id)
        if seq is None or seq.finished:
            return False
        if seq.in_flight:
            seq.abort_reason = reason
        else:
            self._finish(seq, reason)
        return True

    def forget_kv(self, free_gpu_blocks: int, free_host_blocks: int) -> None:
        """Every job's KV is gone (a KV manager or worker restart): each one recomputes."""
        self.free_gpu, self.free_host, self.num_on_host = free_gpu_blocks, free_host_blocks, 0
        for seq in self.seqs.values():
            seq.ranks_sampling = False
            if seq.holds_kv or not seq.job.needs_prefill:
                self._drop_kv(seq)

    def requeue(self, step: Step) -> None:
        """A step that will never come back (its workers died): its jobs lose the tokens in flight and wait."""
        for seq in step.seqs:
            seq.in_flight -= 1
            if seq.in_flight == 0:
                self.flying.discard(seq.request_id)
            if not seq.finished:
                seq.job.num_generated = len(seq.generated) + seq.in_flight
                seq.job.needs_prefill = True
                seq.job.prefilled = 0

    # -- one iteration -----------------------------------------------------------------------

    def can_launch(self, seq: Seq) -> bool:
        """Free to run, or (overlap) a decode whose single step in flight feeds it its next token,
        or the next chunk of a prefill whose earlier chunk is in flight (the worker runs steps in order)."""
        if seq.abort_reason:
            return False
        if not seq.in_flight:
            return True
        job = seq.job
        return (
            self.config.overlap
            and self.config.pp_size == 1
            and seq.in_flight == 1
            and seq.table is not None
            and (job.prefilled > 0 if job.needs_prefill else job.num_generated < job.max_tokens)
        )

    def schedule(self, now: float) -> Proposal | None:
        """The next batch in priority order within the limits, or None when nothing can run."""
        if not self.seqs:
            return None
        cfg = self.config
        bs = cfg.block_size
        if cfg.swap_policy == "none":  # no eviction: the batch must fit the free GPU blocks
            jobs = form_batch(
                self.policy.order(now),
                cfg.limits,
                self._busy,  # type: ignore[arg-type]
                free_blocks=self.free_gpu,
                block_size=bs,
                blocks_held=self._held,  # type: ignore[arg-type]
                lookahead=None,  # the jobs that hold KV may sit far down the order
            )
        else:  # jobs without KV start only into blocks free in either tier
            jobs = form_batch(
                self.policy.order(now),
                cfg.limits,
                self._busy,  # type: ignore[arg-type]
                block_size=bs,
                admit_blocks=self.free_gpu + self.free_host,
            )
        if not jobs:
            return None
        batch = [self.seqs[j.request_id] for j in jobs]
        need = 0
        plan = False
        for seq in batch:
            held = len(seq.table) if seq.table is not None else 0
            missing = -(-seq.job.context_len // bs) - held
            if missing > 0 or seq.table is None:
                plan = True
                need += max(missing, 0)
        floor = cfg.reserve if cfg.swap_policy == "proactive" else 0
        swaps = self.num_on_host > 0 or self.free_gpu - need < floor
        if cfg.swap_policy == "proactive" and swaps:
            plan = True
        waiting: list[tuple[str, float]] = []
        if plan and swaps and cfg.swap_policy != "none":
            ids = {seq.request_id for seq in batch}
            seqs, flying = self.seqs, self.flying
            waiting = [
                (rid, e)
                for rid, e in self.enst(self.policy.order(now), now).items()
                if rid not in ids and rid not in flying and seqs[rid].holds_kv
            ]
        demands = [(seq.request_id, seq.job.context_len) for seq in batch]
        if plan and not swaps:
            demands = self._grown(batch, self.free_gpu - need - floor)
        return Proposal(batch, plan, demands, waiting)

    def _grown(self, batch: list[Seq], spare: int) -> list[tuple[str, int]]:
        """Demands that also cover each job's next `GROW_AHEAD` blocks, in priority order while
        `spare` free blocks last (never past the job's last token).

        A job needs a new block every `block_size` tokens, and a batch with any such job asks
        the KV manager (a round trip the worker waits through: ~2 ms of a 30-70 ms CPU
        iteration). Topping every job up whenever one asks makes the next ask at least a
        block's worth of iterations away, whatever the batch size."""
        bs = self.config.block_size
        demands = []
        for seq in batch:
            job = seq.job
            tokens = job.context_len
            grown = min(tokens + GROW_AHEAD * bs, job.prompt_len + job.max_tokens)
            extra = max(0, -(-grown // bs) - max(-(-tokens // bs), len(seq.table or ())))
            if 0 < extra <= spare:
                tokens, spare = grown, spare - extra
            demands.append((seq.request_id, tokens))
        return demands

    def drop_victim(self, now: float) -> str | None:
        """Under swap policy "none", when nothing fits and nothing runs: the lowest-priority KV holder.

        Its KV is forgotten here (it recomputes); the caller frees its blocks. None when no
        job holds KV or a step is in flight (it will free blocks when it ends).
        """
        if self.flying:
            return None
        holders = [j for j in self.policy.order(now) if self.seqs[j.request_id].holds_kv]
        if not holders:
            return None
        seq = self.seqs[holders[-1].request_id]
        self.free_gpu += len(seq.table or ())
        self._drop_kv(seq)
        return seq.request_id

    def launch(self, proposal: Proposal, plan: KVPlan | None, now: float) -> Step | None:
        """Applies the KV manager's answer (when asked) and starts the step; None if no job got its blocks."""
        if plan is not None:
            self._apply_plan(plan)
        batch = [
            seq
            for seq in proposal.batch
            if not seq.finished and (plan is None or seq.request_id in plan.tables)
        ]
        if not batch:
            return None
        scheduled = {seq.request_id for seq in batch}
        self._mark_preempted(scheduled | self.flying)
        inputs: list[SeqInput] = []
        prefill_tokens = decode_seqs = context_tokens = 0
        chunks = chunk_tokens([seq.job for seq in batch], self.config.limits)
        for seq, n in zip(batch, chunks, strict=True):
            job = seq.job
            context = job.context_len
            prefill = job.needs_prefill
            partial = False
            if prefill:  # the context from what earlier chunks covered: all of it, or a chunk
                start = job.prefilled
                partial = start + n < context
                tokens = (seq.prompt + seq.generated)[start : start + n]
                prefill_tokens += n
                context = start + n
            else:
                tokens, start = (seq.generated[-1:] if not seq.pending else []), context - 1
                decode_seqs += 1
            context_tokens += context
            inputs.append(SeqInput(seq, tokens, start, job.num_generated, prefill, partial))
            if seq.state != "running":
                self._events.append(Event("scheduled", seq, first=not seq.ever_scheduled))
                seq.state, seq.ever_scheduled = "running", True
            seq.in_flight += 1
            self.flying.add(seq.request_id)
            if partial:  # no token comes back for it: its next chunk starts where this one ends
                job.prefilled = context
                continue
            job.num_generated += 1  # launched: the next step's context counts it
            job.needs_prefill = False
            job.prefilled = 0
        self.steps += 1
        return Step(self.steps, inputs, prefill_tokens, decode_seqs, context_tokens, now)

    def complete(
        self,
        step: Step,
        tokens: list[int] | None,
        elapsed: float,
        now: float,
        error: str = "",
        extras: list[object] | None = None,
    ) -> None:
        """The step's tokens (one per job, batch order) or its failure (`tokens` None, `error` why).

        `extras` (batch order) ride along on the token events (the Engine's logprobs)."""
        self.enst.observe(elapsed)
        seqs = step.seqs
        for seq in seqs:
            seq.in_flight -= 1
            if seq.in_flight == 0:
                self.flying.discard(seq.request_id)
        if tokens is None:
            for seq in seqs:
                if not seq.finished:
                    self._finish(seq, ERROR, error)
            return
        eos = self.config.eos_token_id
        for i, (item, token) in enumerate(zip(step.inputs, tokens, strict=True)):
            seq = item.seq
            if seq.finished or item.partial:  # sampled after its last token (overlap), aborted, or a chunk
                continue
            first = not seq.generated
            seq.generated.append(token)
            reason = ""
            if len(seq.generated) > seq.min_tokens and (
                (token == eos and not seq.ignore_eos) or token in seq.stop_token_ids
            ):
                reason = STOP
            elif len(seq.generated) >= seq.job.max_tokens:
                reason = LENGTH
            data = extras[i] if extras is not None else None
            self._events.append(Event("token", seq, token, first=first, last=bool(reason), data=data))
            if reason:
                self._finish(seq, reason)
        self._transitions(self.policy.on_iteration_done([seq.job for seq in seqs], elapsed, now))
        for seq in seqs:
            if seq.abort_reason and not seq.finished and not seq.in_flight:
                self._finish(seq, seq.abort_reason)

    # -- what the caller drains ----------------------------------------------------------------

    def take_events(self) -> list[Event]:
        events, self._events = self._events, []
        return events

    def take_frees(self) -> list[str]:
        frees, self._frees = self._frees, []
        return frees

    def observe_free(self, free_gpu_blocks: int, free_host_blocks: int) -> None:
        """Free counts from a KV manager answer that was not a plan (freeing finished jobs)."""
        self.free_gpu, self.free_host = free_gpu_blocks, free_host_blocks

    # -- internals -----------------------------------------------------------------------------

    def _apply_plan(self, plan: KVPlan) -> None:
        self.free_gpu, self.free_host = plan.free_gpu_blocks, plan.free_host_blocks
        seqs, events = self.seqs, self._events
        for rid in plan.swapped_out:
            if (seq := seqs.get(rid)) is not None:
                seq.table, seq.ranks_blocks = None, 0
                if not seq.on_host:
                    seq.on_host = True
                    self.num_on_host += 1
                seq.swaps_out += 1
                seq.state = "swapped"
                events.append(Event("swapped_out", seq))
        for rid in plan.swapped_in:
            if (seq := seqs.get(rid)) is not None and seq.on_host:
                seq.on_host = False
                self.num_on_host -= 1
                seq.table = []  # on the GPU; its table is known once it is scheduled (below)
                if seq.state == "swapped":
                    seq.state = "preempted"
                events.append(Event("swapped_in", seq))
        for rid in plan.recompute:
            if (seq := seqs.get(rid)) is not None:
                self._drop_kv(seq)
        offsets = plan.offsets
        for rid, table in plan.tables.items():
            seq = seqs.get(rid)
            if seq is None or seq.finished:  # finished while the plan was made: its blocks go back
                self._frees.append(rid)
                continue
            old = seq.table
            if offset := offsets.get(rid, 0):  # the blocks after the `offset` the core holds
                seq.table = old[:offset] + table  # type: ignore[index]
                continue
            if old is None or len(table) < len(old) or table[: len(old)] != old:
                seq.ranks_blocks = 0  # a new table (swapped back in): the ranks get all of it
            seq.table = table

    def _drop_kv(self, seq: Seq) -> None:
        if seq.on_host:
            self.num_on_host -= 1
        seq.table, seq.on_host, seq.ranks_blocks = None, False, 0
        seq.job.needs_prefill = True
        seq.job.prefilled = 0
        seq.recomputes += 1
        if seq.state != "queued":
            seq.state = "preempted"
        self._events.append(Event("recomputed", seq))

    def _mark_preempted(self, scheduled: set[str]) -> None:
        """Jobs that ran last time and are left out now were preempted at this iteration boundary."""
        for rid in self.running - scheduled:
            seq = self.seqs.get(rid)
            if seq is not None:
                seq.state = "preempted"
                seq.job.preemptions += 1
                self._events.append(Event("preempted", seq))
        self.running = scheduled

    def _finish(self, seq: Seq, reason: str, error: str = "") -> None:
        seq.finish_reason, seq.state, seq.error = reason, STATE_OF_REASON[reason], error
        rid = seq.request_id
        if reason in (STOP, LENGTH):
            self.policy.completed(seq.job)
        self.policy.remove(rid)
        del self.seqs[rid]
        self.running.discard(rid)
        if seq.holds_kv:
            self._frees.append(rid)
            if seq.on_host:
                self.num_on_host -= 1
            seq.table, seq.on_host = None, False
        self._events.append(Event("finished", seq))

    def _transitions(self, transitions: list[Transition]) -> None:
        seqs = self.seqs
        for t in transitions:
            if (seq := seqs.get(t.request_id)) is not None:
                self._events.append(Event(t.kind, seq, from_level=t.from_level, to_level=t.to_level))
