"""The live iteration loop: drives the scheduling core, the KV manager and the worker ranks.

The decisions (policy, batch, KV accounting, events) are the core's (services/scheduler/core),
the same code the simulator drives. The Engine adds what is live: the kvmanager's plan
stream (asked only when the core says the batch needs blocks it does not hold or a swap
may be due), the step stream to every worker rank, and the mapping of the core's events to
client streams, trace spans, metrics and Redis (written once per iteration, in one pipeline,
off the critical path). Up to `slots` steps are in flight: one per pipeline stage, plus
(with overlap) the next step of the same jobs, sent before the current one's tokens are back.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from fastserve import tracing
from fastserve.store import JobLog
from fastserve.v1 import common_pb2, kvmanager_pb2, scheduler_pb2, worker_pb2

from . import metrics
from .core import CANCELLED, ERROR, Event, KVPlan, SchedulerCore, Seq, SeqInput, Step
from .kvclient import KVClient, KVError
from .policy import CostModel
from .workers import WorkerError, WorkerGroup

log = logging.getLogger("fastserve.scheduler.engine")

FR = common_pb2.FinishReason
FINISH_REASON = {
    "stop": FR.FINISH_REASON_STOP,
    "length": FR.FINISH_REASON_LENGTH,
    CANCELLED: FR.FINISH_REASON_CANCELLED,
    ERROR: FR.FINISH_REASON_ERROR,
}
CORE_REASON = {code: name for name, code in FINISH_REASON.items()}


def chunkable(sampling: common_pb2.ResolvedSampling) -> bool:
    """Whether a job's prefill may be split into chunks: not when the worker needs its whole prompt in
    one step (prompt logprobs, penalties counting prompt tokens, a grammar started with the prompt)."""
    return not (
        sampling.prompt_logprobs
        or sampling.presence_penalty
        or sampling.frequency_penalty
        or sampling.repetition_penalty != 1.0
        or sampling.HasField("structured_outputs")
    )


@dataclass(eq=False)
class LiveJob:
    """A job's live side: its request, output stream and span; the core's Seq holds the rest."""

    request: scheduler_pb2.SubmitRequest
    seq: Seq = field(init=False)
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    span: trace.Span = trace.INVALID_SPAN
    first_token_time: float = 0.0
    finish_time: float = 0.0
    pending: scheduler_pb2.SubmitResponse | None = None  # tokens not streamed yet (--stream-interval)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def state(self) -> str:
        return self.seq.state

    @property
    def finished(self) -> bool:
        return self.seq.finished

    def record(self) -> dict[str, object]:
        seq, job = self.seq, self.seq.job
        return {
            "state": seq.state,
            "prompt_tokens": job.prompt_len,
            "generated_tokens": len(seq.generated),
            "queue_level": job.level,
            "first_token_time": self.first_token_time,
            "finish_time": self.finish_time,
            "preemptions": job.preemptions,
            "demotions": job.demotions,
            "promotions": job.promotions,
            "swaps_out": seq.swaps_out,
            "recomputes": seq.recomputes,
            "queue_account": job.quantum_used,
            "finish_reason": seq.finish_reason,
            **({"predicted_len": job.predicted_len} if job.predicted_len is not None else {}),
        }


class Engine:
    def __init__(
        self,
        core: SchedulerCore,
        workers: WorkerGroup,
        kv_stub: object,
        store: JobLog,
        cost_model: CostModel,
        block_bytes: int,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
        stream_interval: int = 1,
    ) -> None:
        self.core = core
        # a job's tokens go to its stream this many at a time (its first at once, its last with the
        # outcome): fewer messages through the scheduler, the gateway and the client per token
        self.stream_interval = stream_interval
        self.workers = workers
        self.kv = KVClient(kv_stub, self._freed)  # type: ignore[arg-type]
        self.store = store
        self.cost_model = cost_model
        self.block_bytes = block_bytes  # one KV block on one rank, for the swap metrics
        self.tracer = tracer or trace.get_tracer("fastserve.scheduler")
        self.jobs: dict[str, LiveJob] = {}
        self.dirty: dict[str, LiveJob] = {}
        self.wakeup = asyncio.Event()
        self._levels_seen: set[int] = set()
        # A worker rank or the kvmanager went away: no new iteration starts until `recover` (set by
        # the service) has the stack whole again; then every job's KV is gone and it recomputes.
        self.kv_lost: str = ""
        self.recover: Callable[[], Awaitable[None]] | None = None
        self._last_reply = 0.0  # when the last step's answer came back
        self.finished_since_step: list[str] = []  # told to the workers with the next step
        self._step_ids = itertools.count(1)  # worker step ids (swap-only steps have one too)
        # prompt token ids -> predicted output tokens (--length-predictor), for the predicted-* policies
        self.predictor: Callable[[list[int]], int] | None = None
        self.clock = clock  # scheduling time (fastserve.bench.overhead runs the Engine on a simulated one)

    def _freed(self, free_gpu_blocks: int, free_host_blocks: int) -> None:
        self.core.observe_free(free_gpu_blocks, free_host_blocks)
        self.wakeup.set()  # jobs waiting for blocks may fit now

    @property
    def iterations(self) -> int:
        return self.core.steps

    # -- requests in and out -------------------------------------------------------------

    def submit(
        self,
        request: scheduler_pb2.SubmitRequest,
        generated: list[int] | None = None,
        queue: tuple[int, float] | None = None,
        predicted_len: int | None = None,
    ) -> LiveJob:
        """A new job, or (with `generated`) one taken on again with the tokens it had: it recomputes;
        `queue`: the (level, account) it had before a restart; `predicted_len`: the output length
        predicted when it was first taken on (else the predictor, if any, predicts it now)."""
        live = LiveJob(request)
        live.span = self.tracer.start_span(
            "fastserve.schedule",
            context=tracing.extract(request.trace_context),
            attributes={
                "fastserve.request_id": request.request_id,
                "gen_ai.usage.input_tokens": len(request.prompt_token_ids),
                "gen_ai.request.max_tokens": request.sampling.max_tokens,
            },
        )
        self.jobs[request.request_id] = live
        if predicted_len is None and self.predictor is not None:
            predicted_len = self.predictor(list(request.prompt_token_ids))
        live.seq = self.core.add(
            request.request_id,
            list(request.prompt_token_ids),
            request.sampling.max_tokens,
            self.clock(),
            sampling=request.sampling,
            ignore_eos=request.sampling.ignore_eos,
            min_tokens=request.sampling.min_tokens,
            stop_token_ids=frozenset(request.sampling.stop_token_ids),
            generated=generated,
            queue=queue,
            predicted_len=predicted_len,
            chunkable=chunkable(request.sampling),
        )
        self._dispatch()
        self.wakeup.set()
        return live

    def abort(self, request_id: str, reason: int = FR.FINISH_REASON_CANCELLED) -> bool:
        found = self.core.abort(request_id, CORE_REASON.get(reason, CANCELLED))
        self._dispatch()
        self.wakeup.set()
        return found

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.kv.start()
        in_flight: dict[asyncio.Task, Step] = {}
        slots = self.core.config.slots
        while True:
            try:
                if frees := self.core.take_frees():
                    await self.kv.free(frees)
                while len(in_flight) < slots and not self._outage():
                    launched = await self._next_step()
                    if launched is None:
                        break
                    step, request = launched
                    in_flight[asyncio.create_task(self._execute(step, request))] = step
            except (KVError, grpc.aio.AioRpcError) as exc:
                self.kv_lost = f"kvmanager: {exc}"
            self._dispatch()
            if self._outage() and not in_flight and self.recover is not None:
                self.write_store()
                await self.recover()
                continue
            if not in_flight:
                self._observe_queues(0)  # idle: the gauges say so instead of keeping the last iteration's
                self.write_store()
                await self.wakeup.wait()
                self.wakeup.clear()
                continue
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: in_flight[t].id):
                self._complete(in_flight.pop(task), *task.result())
            self._dispatch()
            self.write_store()

    def _outage(self) -> str:
        if self.workers.broken is not None:
            return str(self.workers.broken)
        return self.kv_lost

    def forget_kv(self) -> None:
        """Every job's KV is gone (its worker group or the kvmanager restarted): each one recomputes.

        The kvmanager was configured anew: all its blocks are free, and a fresh plan stream opens."""
        config = self.core.config
        self.core.forget_kv(config.num_gpu_blocks, config.host_blocks)
        self.core.take_frees()  # a fresh kvmanager holds nothing to free
        self.kv.start()
        self.kv_lost = ""
        self._dispatch()
        self.wakeup.set()

    async def _next_step(self) -> tuple[Step, worker_pb2.StepRequest] | None:
        core = self.core
        now = self.clock()
        started = time.perf_counter()
        proposal = core.schedule(now)
        metrics.POLICY_TIME.observe(time.perf_counter() - started)
        if proposal is None:
            return None
        plan: KVPlan | None = None
        reply = kvmanager_pb2.PlanResponse()
        if proposal.plan:
            started = time.perf_counter()
            reply = await self.kv.plan(
                kvmanager_pb2.PlanRequest(
                    iteration=core.steps,
                    batch=[
                        kvmanager_pb2.JobDemand(request_id=r, num_tokens=n, held_blocks=len(seq.table or ()))
                        for (r, n), seq in zip(proposal.demands, proposal.batch, strict=True)
                    ],
                    waiting=[kvmanager_pb2.JobHint(request_id=r, enst=e) for r, e in proposal.waiting],
                    free=core.take_frees(),
                )
            )
            metrics.PLAN_TIME.observe(time.perf_counter() - started)
            plan = KVPlan(
                tables={t.request_id: list(t.blocks) for t in reply.tables},
                offsets={t.request_id: t.offset for t in reply.tables if t.offset},
                swapped_in=list(reply.swapped_in),
                swapped_out=list(reply.swapped_out),
                recompute=list(reply.recompute),
                free_gpu_blocks=reply.free_gpu_blocks,
                free_host_blocks=reply.free_host_blocks,
            )
            if reply.swap_out:
                metrics.SWAP_BYTES_OUT.inc(len(reply.swap_out) * self.block_bytes)
            if reply.swap_in or reply.prefetch:
                metrics.SWAP_BYTES_IN.inc((len(reply.swap_in) + len(reply.prefetch)) * self.block_bytes)
        step = core.launch(proposal, plan, now)
        if step is None:
            if reply.swap_in or reply.swap_out or reply.prefetch:  # the plan moved blocks: run its swaps
                return self._swap_only(reply)
            return None
        self._observe_queues(len(step.inputs))
        move = worker_pb2.BlockMove
        request = worker_pb2.StepRequest(
            seqs=[self._seq_step(i) for i in step.inputs],
            finished=self.finished_since_step,
            swap_in=[move(src=c.src, dst=c.dst) for c in reply.swap_in],
            swap_out=[move(src=c.src, dst=c.dst) for c in reply.swap_out],
            prefetch=[move(src=c.src, dst=c.dst) for c in reply.prefetch],
        )
        self.finished_since_step = []
        return step, request

    def _swap_only(self, reply: kvmanager_pb2.PlanResponse) -> tuple[Step, worker_pb2.StepRequest]:
        """A plan whose batch was all deferred still moved blocks: a step with no jobs executes the moves."""
        move = worker_pb2.BlockMove
        step = Step(0, [], 0, 0, 0, self.clock())
        return step, worker_pb2.StepRequest(
            swap_in=[move(src=c.src, dst=c.dst) for c in reply.swap_in],
            swap_out=[move(src=c.src, dst=c.dst) for c in reply.swap_out],
            prefetch=[move(src=c.src, dst=c.dst) for c in reply.prefetch],
        )

    def _seq_step(self, item: SeqInput) -> worker_pb2.SeqStep:
        """One job's part of the step: only what the ranks lack (new blocks, sampling the first time)."""
        seq = item.seq
        table, offset = seq.table, seq.ranks_blocks
        step = worker_pb2.SeqStep(
            request_id=seq.request_id,
            token_ids=item.token_ids,
            start_pos=item.start_pos,
            block_table=table[offset:] if offset else table,
            table_offset=offset,
            sample_index=item.sample_index,
            partial=item.partial,
        )
        seq.ranks_blocks = len(table)
        if not seq.ranks_sampling:
            step.sampling.CopyFrom(seq.sampling)
            seq.ranks_sampling = True
        live = self.jobs.get(seq.request_id)
        if live is not None and live.span.is_recording():
            step.traceparent = tracing.inject(trace.set_span_in_context(live.span)).get("traceparent", "")
        return step

    async def _execute(
        self, step: Step, request: worker_pb2.StepRequest
    ) -> tuple[list[int] | None, list[object] | None, float, str]:
        jobs = [live for i in step.inputs if (live := self.jobs.get(i.seq.request_id)) is not None]
        # The iteration joins the trace of its first (highest-priority) job and links to every job it
        # served; when that job's span is not recorded (tracing off or sampled out) nothing is linked.
        traced = bool(jobs) and jobs[0].span.is_recording()
        span = self.tracer.start_span(
            "fastserve.iteration",
            context=trace.set_span_in_context(jobs[0].span) if jobs else None,
            links=[trace.Link(live.span.get_span_context()) for live in jobs] if traced else (),
            attributes={"fastserve.iteration": step.id, "fastserve.batch_size": len(step.inputs)},
        )
        request.step_id = next(self._step_ids)
        if span.is_recording():
            request.trace_context.update(tracing.inject(trace.set_span_in_context(span)))
        sent = self.clock()
        try:
            reply = await self.workers.step(request)
        except WorkerError as exc:
            span.set_status(trace.StatusCode.ERROR, str(exc))
            return None, None, self.clock() - sent, str(exc)
        finally:
            span.end()
        done = self.clock()
        # with steps queued back to back, this one's time starts when the previous one's ended
        elapsed = done - max(sent, self._last_reply)
        self._last_reply = done
        metrics.COMPUTE_TIME.observe(reply.compute_seconds)
        metrics.SWAP_SECONDS.inc(reply.swap_seconds)
        metrics.SWAP_EXPOSED_SECONDS.inc(reply.exposed_swap_seconds)
        n = len(step.inputs)
        if len(reply.token_ids) != n:
            return None, None, elapsed, f"driver returned {len(reply.token_ids)} tokens for {n} jobs"
        logprobs: list[object] | None = None
        if reply.logprobs:
            logprobs = [None] * n
            for lp in reply.logprobs:
                logprobs[lp.seq_index] = lp
        return list(reply.token_ids), logprobs, elapsed, ""

    def _complete(
        self, step: Step, tokens: list[int] | None, logprobs: list[object] | None, elapsed: float, error: str
    ) -> None:
        if not step.inputs:  # a swap-only step
            if tokens is None:
                log.error("swap-only step failed: %s", error)
            return
        metrics.ITERATION_TIME.observe(elapsed)
        metrics.ITERATION_TOKENS.observe(step.tokens_fed)
        if tokens is None and self.workers.broken is not None:
            self.core.requeue(step)  # a rank died: these jobs wait for the group to come back, then recompute
            return
        if tokens is None:
            log.error("iteration failed for %d jobs: %s", len(step.inputs), error)
        else:
            self.cost_model.observe((step.prefill_tokens, step.decode_seqs, step.context_tokens, elapsed))
        self.core.complete(step, tokens, elapsed, self.clock(), error, logprobs)

    # -- events to streams, spans, metrics and Redis -------------------------------------------

    def _dispatch(self) -> None:
        jobs = self.jobs
        for event in self.core.take_events():
            live = jobs.get(event.seq.request_id)
            if live is None:
                continue
            self.dirty[live.request_id] = live
            handler = _HANDLERS.get(event.kind)
            if handler is not None:
                handler(self, live, event)
            else:
                live.span.add_event(event.kind, {"level": event.seq.job.level})

    def _on_token(self, live: LiveJob, event: Event) -> None:
        if event.first:
            live.first_token_time = time.time()
            live.span.add_event("first_token")
        message = live.pending
        if message is None:
            message = live.pending = scheduler_pb2.SubmitResponse()
        message.token_ids.append(event.value)
        if event.data is not None:  # the worker's SeqLogprobs
            if event.data.HasField("sampled"):
                message.logprobs.append(event.data.sampled)
            message.prompt_logprobs.extend(event.data.prompt_logprobs)
        # the final message carries the last tokens and the outcome (`_on_finished`)
        if not event.last and (event.first or len(message.token_ids) >= self.stream_interval):
            live.outbox.put_nowait(message)
            live.pending = None

    def _on_scheduled(self, live: LiveJob, event: Event) -> None:
        if event.first:
            metrics.QUEUE_TIME.observe(self.clock() - event.seq.job.arrival_time)
        live.span.add_event("scheduled", {"level": event.seq.job.level})

    def _on_transition(self, live: LiveJob, event: Event) -> None:
        (metrics.DEMOTIONS if event.kind == "demoted" else metrics.PROMOTIONS).inc()
        live.span.add_event(event.kind, {"from_level": event.from_level, "to_level": event.to_level})

    def _on_preempted(self, live: LiveJob, event: Event) -> None:
        metrics.PREEMPTIONS.inc()
        live.span.add_event("preempted", {"level": event.seq.job.level})

    def _on_recomputed(self, live: LiveJob, event: Event) -> None:
        metrics.RECOMPUTES.inc()
        live.span.add_event("recomputed", {"level": event.seq.job.level})

    def _on_finished(self, live: LiveJob, event: Event) -> None:
        seq = event.seq
        live.finish_time = time.time()
        del self.jobs[live.request_id]
        self.finished_since_step.append(live.request_id)
        metrics.FINISHED.labels(seq.state).inc()
        live.span.add_event(seq.state, {"finish_reason": seq.finish_reason, "level": seq.job.level})
        live.span.set_attribute("gen_ai.usage.output_tokens", len(seq.generated))
        live.span.end()
        last = live.pending or scheduler_pb2.SubmitResponse()
        live.pending = None
        last.finish_reason = FINISH_REASON[seq.finish_reason]
        last.prompt_tokens = seq.job.prompt_len
        last.completion_tokens = len(seq.generated)
        last.error = seq.error
        if seq.finish_reason == "stop":
            token = seq.generated[-1]
            if token == self.core.config.eos_token_id and not seq.ignore_eos:
                last.stop_reason.eos = True
            else:
                last.stop_reason.token_id = token
        live.outbox.put_nowait(last)

    def _observe_queues(self, batch_size: int) -> None:
        core = self.core
        metrics.RUNNING.set(batch_size)
        waiting = dict(core.policy.queue_lengths())
        for rid in core.running:
            if (seq := core.seqs.get(rid)) is not None and seq.state == "running":
                waiting[seq.job.level] = waiting.get(seq.job.level, 1) - 1
        for level in waiting.keys() | self._levels_seen:
            metrics.WAITING.labels(str(level)).set(waiting.get(level, 0))
        self._levels_seen |= waiting.keys()
        metrics.GPU_BLOCKS_USED.set(core.config.num_gpu_blocks - core.free_gpu)

    def write_store(self) -> None:
        """Hands what changed to the job log; its background task writes Redis (never blocking here)."""
        for rid, live in self.dirty.items():
            self.store.update(rid, live.record(), live.seq.generated)
        self.dirty = {}


_HANDLERS = {
    "token": Engine._on_token,
    "scheduled": Engine._on_scheduled,
    "demoted": Engine._on_transition,
    "promoted": Engine._on_transition,
    "preempted": Engine._on_preempted,
    "recomputed": Engine._on_recomputed,
    "finished": Engine._on_finished,
}
