"""The iteration loop: before every model iteration, ask the policy which jobs run.

Per iteration: order the jobs (policy), form a batch within the limits and the KV
budget, get block tables from the kvmanager, run the step on every worker rank,
hand each job its token, account the iteration to the policy (demotions,
promotions), and write what changed to Redis in one pipeline. With pipeline
parallelism k batches of disjoint jobs are in flight at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from fastserve import tracing
from fastserve.store import JobLog
from fastserve.v1 import common_pb2, kvmanager_pb2, scheduler_pb2, worker_pb2
from fastserve.v1.kvmanager_pb2_grpc import KVManagerStub

from . import metrics
from .enst import EnstEstimator
from .policy import BatchLimits, CostModel, Job, Policy, Transition, form_batch
from .workers import WorkerError, WorkerGroup

log = logging.getLogger("fastserve.scheduler.engine")

FR = common_pb2.FinishReason
STATE_OF_REASON = {
    FR.FINISH_REASON_STOP: "finished",
    FR.FINISH_REASON_LENGTH: "finished",
    FR.FINISH_REASON_CANCELLED: "cancelled",
    FR.FINISH_REASON_ERROR: "failed",
}


@dataclass
class LiveJob:
    """A job in the live system: the policy's view plus its tokens, sampling and output stream."""

    job: Job
    prompt: list[int]
    request: scheduler_pb2.SubmitRequest
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    generated: list[int] = field(default_factory=list)
    state: str = "queued"
    first_token_time: float = 0.0
    finish_time: float = 0.0
    finish_reason: int = FR.FINISH_REASON_UNSPECIFIED
    abort_reason: int | None = None  # asked to stop while its iteration was in flight
    swaps_out: int = 0
    recomputes: int = 0
    in_flight: bool = False
    span: trace.Span = trace.INVALID_SPAN

    @property
    def request_id(self) -> str:
        return self.job.request_id

    @property
    def finished(self) -> bool:
        return self.finish_reason != FR.FINISH_REASON_UNSPECIFIED

    def step_input(self, block_table: list[int]) -> worker_pb2.SeqStep:
        tokens = self.prompt + self.generated
        prefill = self.job.needs_prefill
        seq = worker_pb2.SeqStep(
            request_id=self.request_id,
            token_ids=tokens if prefill else tokens[-1:],
            start_pos=0 if prefill else len(tokens) - 1,
            block_table=block_table,
            sampling=self.request.sampling,
            sample_index=len(self.generated),
        )
        if self.span.is_recording():
            seq.traceparent = tracing.inject(trace.set_span_in_context(self.span)).get("traceparent", "")
        return seq

    def record(self) -> dict[str, object]:
        job = self.job
        return {
            "state": self.state,
            "prompt_tokens": job.prompt_len,
            "generated_tokens": len(self.generated),
            "queue_level": job.level,
            "first_token_time": self.first_token_time,
            "finish_time": self.finish_time,
            "preemptions": job.preemptions,
            "demotions": job.demotions,
            "promotions": job.promotions,
            "swaps_out": self.swaps_out,
            "recomputes": self.recomputes,
            "queue_account": job.quantum_used,
            "finish_reason": FR.Name(self.finish_reason).removeprefix("FINISH_REASON_").lower()
            if self.finished
            else "",
        }


@dataclass(frozen=True)
class EngineConfig:
    """What the loop needs to know about the deployment (the workers tell most of it)."""

    limits: BatchLimits
    eos_token_id: int
    num_gpu_blocks: int
    block_bytes: int  # bytes of one KV block on one rank, for swap metrics
    pp_size: int = 1
    num_host_blocks: int = 0  # as configured in the kvmanager (0 under --swap-policy recompute)
    block_size: int = 16


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        policy: Policy,
        workers: WorkerGroup,
        kv: KVManagerStub,
        store: JobLog,
        enst: EnstEstimator,
        cost_model: CostModel,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.cost_model = cost_model
        self.config = config
        self.limits = config.limits
        self.policy = policy
        self.workers = workers
        self.kv = kv
        self.store = store
        self.enst = enst
        self.tracer = tracer or trace.get_tracer("fastserve.scheduler")
        self.jobs: dict[str, LiveJob] = {}
        self.free_blocks = config.num_gpu_blocks
        self.free_host_blocks = config.num_host_blocks
        self.holds_kv: set[str] = set()  # jobs with KV blocks in either tier
        self.running: set[str] = set()
        self.pending_free: list[str] = []
        self.finished_since_step: list[str] = []  # told to the workers with the next step
        self.dirty: dict[str, LiveJob] = {}
        self.iterations = 0
        self.wakeup = asyncio.Event()
        self._levels_seen: set[int] = set()
        # A worker rank or the kvmanager went away: no new iteration starts until `recover` (set by
        # the service) has the stack whole again; then every job's KV is gone and it recomputes.
        self.kv_lost: str = ""
        self.recover: Callable[[], Awaitable[None]] | None = None

    # -- requests in and out -------------------------------------------------------------

    def submit(self, request: scheduler_pb2.SubmitRequest) -> LiveJob:
        now = time.monotonic()
        job = Job(
            request_id=request.request_id,
            prompt_len=len(request.prompt_token_ids),
            max_tokens=request.sampling.max_tokens,
            arrival_time=now,
        )
        live = LiveJob(job=job, prompt=list(request.prompt_token_ids), request=request)
        live.span = self.tracer.start_span(
            "fastserve.schedule",
            context=tracing.extract(request.trace_context),
            attributes={
                "fastserve.request_id": job.request_id,
                "gen_ai.usage.input_tokens": job.prompt_len,
                "gen_ai.request.max_tokens": job.max_tokens,
            },
        )
        self.jobs[job.request_id] = live
        self._apply(self.policy.add(job, now))
        live.span.add_event("queued", {"level": job.level})
        self.dirty[job.request_id] = live
        self.wakeup.set()
        return live

    def abort(self, request_id: str, reason: int = FR.FINISH_REASON_CANCELLED) -> bool:
        live = self.jobs.get(request_id)
        if live is None or live.finished:
            return False
        if live.in_flight:
            live.abort_reason = reason  # finished when its iteration comes back
        else:
            self._finish(live, reason)
        self.wakeup.set()
        return True

    def _finish(
        self, live: LiveJob, reason: int, error: str = "", last: scheduler_pb2.SubmitResponse | None = None
    ) -> None:
        """Ends the job; its last message (``last``: the final token's, if any) carries the outcome."""
        live.finish_reason = reason
        live.state = STATE_OF_REASON[reason]
        live.finish_time = time.time()
        self.policy.remove(live.request_id)
        self.jobs.pop(live.request_id, None)
        self.running.discard(live.request_id)
        self.finished_since_step.append(live.request_id)
        metrics.FINISHED.labels(live.state).inc()
        live.span.add_event(
            live.state, {"finish_reason": live.record()["finish_reason"], "level": live.job.level}
        )
        live.span.set_attribute("gen_ai.usage.output_tokens", len(live.generated))
        live.span.end()
        if live.request_id in self.holds_kv:
            self.holds_kv.discard(live.request_id)
            self.pending_free.append(live.request_id)
        self.dirty[live.request_id] = live
        last = last or scheduler_pb2.SubmitResponse()
        last.finish_reason = reason
        last.prompt_tokens = live.job.prompt_len
        last.completion_tokens = len(live.generated)
        last.error = error
        live.outbox.put_nowait(last)

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        in_flight: dict[asyncio.Task, list[LiveJob]] = {}
        while True:
            try:
                await self._free_finished()
                while len(in_flight) < self.config.pp_size and not self._outage():
                    batch, step = await self._next_batch()
                    if not batch:
                        break
                    for live in batch:
                        live.in_flight = True
                    task = asyncio.create_task(self._execute(batch, step))
                    in_flight[task] = batch
            except grpc.aio.AioRpcError as exc:
                self.kv_lost = f"kvmanager: {exc.code().name} {exc.details()}"
            if self._outage() and not in_flight and self.recover is not None:
                await self._write_store()
                await self.recover()
                continue
            if not in_flight:
                self._observe_queues([])  # idle: the gauges say so instead of keeping the last iteration's
                await self._write_store()
                await self.wakeup.wait()
                self.wakeup.clear()
                continue
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._complete(in_flight.pop(task), *task.result())
            await self._write_store()

    async def _next_batch(self) -> tuple[list[LiveJob], worker_pb2.StepRequest]:
        now = time.monotonic()
        busy = {rid for rid, live in self.jobs.items() if live.in_flight}
        ordered = list(self.policy.order(now))
        # No GPU budget here: the kvmanager makes room by swapping out (or dropping) idle jobs, or defers.
        # Jobs without KV start only into blocks free in either tier (see form_batch).
        chosen = form_batch(
            ordered,
            self.limits,
            busy=busy,
            block_size=self.config.block_size,
            admit_blocks=self.free_blocks + self.free_host_blocks,
        )
        metrics.POLICY_TIME.observe(time.monotonic() - now)
        if not chosen:
            return [], worker_pb2.StepRequest()
        chosen_ids = {j.request_id for j in chosen}
        waiting = [
            kvmanager_pb2.JobHint(request_id=rid, enst=enst)
            for rid, enst in self.enst(ordered, now).items()
            if rid in self.holds_kv and rid not in chosen_ids and rid not in busy
        ]
        plan_started = time.monotonic()
        plan = await self.kv.Plan(
            kvmanager_pb2.PlanRequest(
                iteration=self.iterations,
                waiting=waiting,
                batch=[
                    kvmanager_pb2.JobDemand(request_id=j.request_id, num_tokens=j.context_len) for j in chosen
                ],
            )
        )
        metrics.PLAN_TIME.observe(time.monotonic() - plan_started)
        self.free_blocks, self.free_host_blocks = plan.free_gpu_blocks, plan.free_host_blocks
        self._apply_plan(plan)
        tables = {t.request_id: list(t.blocks) for t in plan.tables}
        batch = [
            self.jobs[j.request_id] for j in chosen if j.request_id in tables and j.request_id in self.jobs
        ]
        # cancelled while the plan was made, and not yet queued for freeing: its new blocks go back
        self.pending_free.extend(
            rid for rid in tables if rid not in self.jobs and rid not in self.pending_free
        )
        self.holds_kv.update(rid for rid in tables if rid in self.jobs)
        self._mark_preempted({live.request_id for live in batch} | busy)
        for live in batch:
            if live.state != "running":
                if live.job.last_run_time is None:
                    metrics.QUEUE_TIME.observe(now - live.job.arrival_time)
                live.span.add_event("scheduled", {"level": live.job.level})
                live.state = "running"
                self.dirty[live.request_id] = live
        self._observe_queues(batch)
        move = worker_pb2.BlockMove
        step = worker_pb2.StepRequest(
            seqs=[live.step_input(tables[live.request_id]) for live in batch],
            swap_in=[move(src=c.src, dst=c.dst) for c in plan.swap_in],
            swap_out=[move(src=c.src, dst=c.dst) for c in plan.swap_out],
            prefetch=[move(src=c.src, dst=c.dst) for c in plan.prefetch],
            finished=self.finished_since_step,
        )
        self.finished_since_step = []
        return batch, step

    def _apply_plan(self, plan: kvmanager_pb2.PlanResponse) -> None:
        """Records what the plan did to idle jobs' KV: swapped out, back in, or dropped for recompute."""
        for rid in plan.swapped_out:
            if live := self.jobs.get(rid):
                live.swaps_out += 1
                live.state = "swapped"
                live.span.add_event("swapped_out", {"level": live.job.level})
                self.dirty[rid] = live
        for rid in plan.swapped_in:
            if live := self.jobs.get(rid):
                live.span.add_event("swapped_in", {"level": live.job.level})
                if live.state == "swapped":
                    live.state = "preempted"
                    self.dirty[rid] = live
        for rid in plan.recompute:
            self.holds_kv.discard(rid)
            if live := self.jobs.get(rid):
                live.recomputes += 1
                metrics.RECOMPUTES.inc()
                live.job.needs_prefill = True
                live.state = "preempted"
                live.span.add_event("recomputed", {"level": live.job.level})
                self.dirty[rid] = live
        metrics.SWAP_BYTES.labels("out").inc(len(plan.swap_out) * self.config.block_bytes)
        metrics.SWAP_BYTES.labels("in").inc(
            (len(plan.swap_in) + len(plan.prefetch)) * self.config.block_bytes
        )

    def _observe_queues(self, batch: list[LiveJob]) -> None:
        metrics.RUNNING.set(len(batch))
        waiting: dict[int, int] = {}
        for live in self.jobs.values():
            if live.state != "running":
                waiting[live.job.level] = waiting.get(live.job.level, 0) + 1
        for level in set(waiting) | self._levels_seen:
            metrics.WAITING.labels(str(level)).set(waiting.get(level, 0))
        self._levels_seen |= set(waiting)
        metrics.KV_BLOCKS_USED.labels("gpu").set(self.config.num_gpu_blocks - self.free_blocks)

    def _mark_preempted(self, scheduled: set[str]) -> None:
        """Jobs that ran last time and are left out now were preempted at this iteration boundary."""
        for rid in self.running - scheduled:
            live = self.jobs.get(rid)
            if live is not None:
                live.state = "preempted"
                live.job.preemptions += 1
                metrics.PREEMPTIONS.inc()
                live.span.add_event("preempted", {"level": live.job.level})
                self.dirty[rid] = live
        self.running = scheduled

    async def _execute(
        self, batch: list[LiveJob], request: worker_pb2.StepRequest
    ) -> tuple[list[int] | None, dict[int, worker_pb2.SeqLogprobs], float, str]:
        self.iterations += 1
        # The iteration joins the trace of its first (highest-priority) job and links to every job it served.
        span = self.tracer.start_span(
            "fastserve.iteration",
            context=trace.set_span_in_context(batch[0].span),
            links=[trace.Link(live.span.get_span_context()) for live in batch],
            attributes={"fastserve.iteration": self.iterations, "fastserve.batch_size": len(batch)},
        )
        request.step_id = self.iterations
        request.trace_context.update(tracing.inject(trace.set_span_in_context(span)))
        started = time.monotonic()
        try:
            reply = await self.workers.step(request)
        except WorkerError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            return None, {}, time.monotonic() - started, str(exc)
        finally:
            span.end()
        metrics.COMPUTE_TIME.observe(reply.compute_seconds)
        metrics.SWAP_SECONDS.inc(reply.swap_seconds)
        metrics.SWAP_EXPOSED_SECONDS.inc(reply.exposed_swap_seconds)
        if len(reply.token_ids) != len(batch):
            return (
                None,
                {},
                time.monotonic() - started,
                f"driver returned {len(reply.token_ids)} tokens for {len(batch)} jobs",
            )
        logprobs = {lp.seq_index: lp for lp in reply.logprobs}
        return list(reply.token_ids), logprobs, time.monotonic() - started, ""

    def _complete(
        self,
        batch: list[LiveJob],
        tokens: list[int] | None,
        logprobs: dict[int, worker_pb2.SeqLogprobs],
        elapsed: float,
        error: str,
    ) -> None:
        now = time.monotonic()
        for live in batch:
            live.in_flight = False
        metrics.ITERATION_TIME.observe(elapsed)
        self.enst.observe(elapsed)
        if tokens is not None:
            jobs = [live.job for live in batch]
            prefill = sum(j.context_len for j in jobs if j.needs_prefill)
            self.cost_model.observe(
                (prefill, sum(not j.needs_prefill for j in jobs), sum(j.context_len for j in jobs), elapsed)
            )
        metrics.ITERATION_TOKENS.observe(sum(live.job.tokens_this_iteration for live in batch))
        if tokens is None and self.workers.broken is not None:
            return  # a rank died: these jobs wait for the group to come back, then recompute
        if tokens is None:
            log.error("iteration failed for %d jobs: %s", len(batch), error)
            for live in batch:
                self._finish(live, FR.FINISH_REASON_ERROR, error)
            return
        for i, (live, token) in enumerate(zip(batch, tokens, strict=True)):
            if live.finished:
                continue
            self._emit(live, token, logprobs.get(i))
        self._apply(self.policy.on_iteration_done([live.job for live in batch], elapsed, now))
        for live in batch:
            if not live.finished and live.abort_reason is not None:
                self._finish(live, live.abort_reason)

    def _emit(self, live: LiveJob, token: int, logprobs: worker_pb2.SeqLogprobs | None = None) -> None:
        live.generated.append(token)
        live.job.num_generated += 1
        live.job.needs_prefill = False
        if not live.first_token_time:
            live.first_token_time = time.time()
            live.span.add_event("first_token")
        self.dirty[live.request_id] = live
        message = scheduler_pb2.SubmitResponse(token_ids=[token])
        if logprobs is not None:
            if logprobs.HasField("sampled"):
                message.logprobs.append(logprobs.sampled)
            message.prompt_logprobs.extend(logprobs.prompt_logprobs)
        sampling = live.request.sampling
        reason = FR.FINISH_REASON_UNSPECIFIED
        if len(live.generated) > sampling.min_tokens:  # the workers mask stop tokens until then
            if token == self.config.eos_token_id and not sampling.ignore_eos:
                reason = FR.FINISH_REASON_STOP
                message.stop_reason.eos = True
            elif token in sampling.stop_token_ids:
                reason = FR.FINISH_REASON_STOP
                message.stop_reason.token_id = token
        if not reason and len(live.generated) >= live.job.max_tokens:
            reason = FR.FINISH_REASON_LENGTH
        if reason:
            self._finish(live, reason, last=message)
        else:
            live.outbox.put_nowait(message)

    def _apply(self, transitions: list[Transition]) -> None:
        for t in transitions:
            if t.kind == "demoted":
                metrics.DEMOTIONS.inc()
            elif t.kind == "promoted":
                metrics.PROMOTIONS.inc()
            live = self.jobs.get(t.request_id)
            if live is not None:
                live.span.add_event(t.kind, {"from_level": t.from_level, "to_level": t.to_level})
                self.dirty[t.request_id] = live

    async def _free_finished(self) -> None:
        if not self.pending_free:
            return
        ids, self.pending_free = self.pending_free, []
        reply = await self.kv.Free(kvmanager_pb2.FreeRequest(request_ids=ids))
        self.free_blocks, self.free_host_blocks = reply.free_gpu_blocks, reply.free_host_blocks

    def _outage(self) -> str:
        if self.workers.broken is not None:
            return str(self.workers.broken)
        return self.kv_lost

    def forget_kv(self) -> None:
        """Every job's KV is gone (its worker group or the kvmanager restarted): each one recomputes."""
        for rid, live in self.jobs.items():
            if rid in self.holds_kv or not live.job.needs_prefill:
                live.recomputes += 1
                metrics.RECOMPUTES.inc()
            live.job.needs_prefill = True
            if live.state in ("running", "swapped"):
                live.state = "preempted"
            self.dirty[rid] = live
        self.holds_kv.clear()
        self.running.clear()
        self.pending_free.clear()
        self.free_blocks, self.free_host_blocks = self.config.num_gpu_blocks, self.config.num_host_blocks
        self.kv_lost = ""
        self.wakeup.set()

    async def _write_store(self) -> None:
        """Hands what changed to the job log; its background task writes Redis (never blocking here)."""
        for rid, live in self.dirty.items():
            self.store.update(rid, live.record(), live.generated)
        self.dirty = {}
