"""One generation request, from a GenerateRequest to its last message, whatever the transport.

The gRPC `Generate` handler and the OpenAI HTTP routes both call `prepare` (validation
and tokenization: raises InvalidRequest before anything is sent) and then iterate
`stream` (the scheduler streams through SchedulerLink, detokenized text, stop strings,
metrics and the request's span). Closing the iterator early cancels the request's jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from fastserve import tracing
from fastserve.tokenizer import Tokenizer
from fastserve.v1 import common_pb2, scheduler_pb2
from fastserve.v1 import gateway_pb2 as pb

from . import metrics
from .admission import Admission, Ticket
from .ids import scoped, unscoped
from .scheduler_link import SchedulerGone, SchedulerLink
from .text_stream import TextStream
from .validation import InvalidRequest, Limits, Sampling, check_envelope, check_length, resolve_sampling

log = logging.getLogger("fastserve.gateway")
FR = common_pb2.FinishReason


class SchedulerUnavailable(Exception):
    """The scheduler could not take or finish the request: not the client's fault."""


@dataclass(frozen=True)
class Prepared:
    """A request that passed validation and admission: what `stream` needs (and must close)."""

    request_id: str  # as the client knows it
    prompt_ids: list[int]
    sampling: Sampling
    arrival: float
    continuous_usage_stats: bool
    owner: str  # digest of the API key that made it; '' on an open server
    ticket: Ticket  # its place in admission control, closed when `stream` ends

    @property
    def key(self) -> str:
        """The id the stack knows the request by: scoped to its owner (see ids.py)."""
        return scoped(self.owner, self.request_id)


@dataclass(frozen=True)
class InFlight:
    """A request this gateway is streaming: its completions' job ids, and who made it."""

    job_ids: list[str]
    owner: str


class Generations:
    def __init__(
        self,
        link: SchedulerLink,
        tokenizer: Tokenizer,
        info: scheduler_pb2.SchedulerInfo,
        limits: Limits,
        tracer: trace.Tracer,
        admission: Admission | None = None,
    ) -> None:
        self.link = link
        self.scheduler = link.stub
        self.tokenizer = tokenizer
        self.info = info
        self.limits = limits
        self.tracer = tracer
        self.admission = admission or Admission(0, 0)
        self.in_flight: dict[str, InFlight] = {}  # by the request's scoped id (ids.py)
        self.job_owners: dict[str, str] = {}  # job id -> the in-flight request it belongs to

    def _check_free(self, owner: str, request_id: str, n: int) -> None:
        """InvalidRequest when the request's id, or a job id it needs, is in flight already. Ids are
        scoped to their owner, so this speaks only of the caller's own requests."""
        if scoped(owner, request_id) in self.in_flight:
            raise InvalidRequest(f"request_id: {request_id!r} is already in flight")
        for job_id in job_ids_of(scoped(owner, request_id), n):
            if (other := self.job_owners.get(job_id)) is not None:
                raise InvalidRequest(
                    f"request_id: {request_id!r} (n={n}) needs job id {unscoped(owner, job_id)!r}, which "
                    f"request {unscoped(owner, other)!r} in flight is using (a request with n > 1 runs its "
                    "completions as '{id}-{index}')"
                )

    def prepare(self, request: pb.GenerateRequest, owner: str = "", ticket: Ticket | None = None) -> Prepared:
        """Validates, admits and tokenizes, in that order (the cheap checks first). InvalidRequest
        names the field and the limit; Overloaded says the server is full. The caller must `stream`
        the result (or close its ticket). `ticket`: admitted already (HTTP admits before it tokenizes
        a chat); closed here if the request is refused."""
        arrival = time.time()
        try:
            check_envelope(request, self.limits)
            sampling = resolve_sampling(request, self.limits)
        except InvalidRequest:
            if ticket is not None:
                ticket.close()
            raise
        ticket = ticket or self.admission.admit()
        try:
            prompt_ids = list(request.prompt_token_ids) or self.tokenizer.encode(request.prompt)
            check_length(len(prompt_ids), sampling.resolved.max_tokens, self.limits)
            request_id = request.request_id or uuid.uuid4().hex
            self._check_free(owner, request_id, sampling.n)
        except BaseException:
            ticket.close()
            raise
        return Prepared(
            request_id, prompt_ids, sampling, arrival, request.continuous_usage_stats, owner, ticket
        )

    async def cancel(self, job_ids: list[str]) -> bool:
        """Cancels these jobs (a request's completions); False when none was in flight."""
        try:
            replies = await asyncio.gather(
                *(self.scheduler.Abort(scheduler_pb2.AbortRequest(request_id=job_id)) for job_id in job_ids)
            )
        except grpc.aio.AioRpcError as exc:
            raise SchedulerUnavailable(f"scheduler: {exc.code().name}: {exc.details()}") from None
        return any(r.found for r in replies)

    async def stream(
        self, job: Prepared, operation: str = "text_completion"
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Messages as the scheduler produces tokens (several completions interleaved when n > 1);
        each completion's last message carries its finish_reason and usage.

        Raises InvalidRequest when the scheduler refuses the request, SchedulerUnavailable when
        it cannot be reached.
        """
        request_id, sampling, key = job.request_id, job.sampling, job.key
        try:
            self._check_free(job.owner, request_id, sampling.n)  # again: HTTP may await since prepare()
        except InvalidRequest:
            job.ticket.close()
            raise
        metrics.PROMPT_TOKENS.inc(len(job.prompt_ids))
        metrics.REQUEST_MAX_TOKENS.observe(sampling.resolved.max_tokens)
        job_ids = job_ids_of(key, sampling.n)
        self.in_flight[key] = InFlight(job_ids, job.owner)
        self.job_owners.update(dict.fromkeys(job_ids, key))
        resolved = sampling.resolved
        streams: list = []
        replies = None
        span = self.tracer.start_span(
            "fastserve.generate",
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.request.model": self.info.model,
                "gen_ai.request.max_tokens": resolved.max_tokens,
                "gen_ai.request.temperature": resolved.temperature,
                "gen_ai.request.top_p": resolved.top_p,
                "gen_ai.request.top_k": resolved.top_k,
                "gen_ai.request.choice.count": sampling.n,
                "gen_ai.usage.input_tokens": len(job.prompt_ids),
                "fastserve.request_id": request_id,
            },
        )
        try:
            trace_context = tracing.inject(trace.set_span_in_context(span))
            streams = [
                self.link.stream(  # the scheduler records the job in Redis
                    scheduler_pb2.SubmitRequest(
                        request_id=job_id,
                        prompt_token_ids=job.prompt_ids,
                        sampling=sampling.job_sampling(i),
                        arrival_time=job.arrival,
                        trace_context=trace_context,
                        owner=job.owner,  # the scheduler records these with the job, for GetRequest / Cancel
                        parent_request_id=key if sampling.n > 1 else "",
                        n=sampling.n if sampling.n > 1 else 0,
                    )
                )
                for i, job_id in enumerate(job_ids)
            ]
            first_sent = last_sent = None
            output_tokens = 0
            reasons: list[str] = []
            replies = merge(
                [
                    self._relay(
                        request_id,
                        job_id,
                        i,
                        stream,
                        len(job.prompt_ids),
                        resolved,
                        job.continuous_usage_stats,
                    )
                    for i, (job_id, stream) in enumerate(zip(job_ids, streams, strict=True))
                ]
            )
            async for reply in replies:
                now = time.time()
                job.ticket.started()
                if reply.token_ids:
                    metrics.GENERATION_TOKENS.inc(len(reply.token_ids))
                    if last_sent is None:
                        first_sent = now
                        metrics.TTFT.observe(now - job.arrival)
                        span.add_event("first_token")
                    else:
                        metrics.INTER_TOKEN.observe(now - last_sent)
                    last_sent = now
                if reply.finish_reason:
                    reason = finish_reason_name(reply.finish_reason)
                    generated = reply.usage.completion_tokens
                    metrics.E2E.observe(now - job.arrival)
                    metrics.FINISHED.labels(reason).inc()
                    metrics.REQUEST_PROMPT_TOKENS.observe(len(job.prompt_ids))
                    metrics.REQUEST_GENERATION_TOKENS.observe(generated)
                    if first_sent is not None and generated > 1:
                        metrics.TPOT.observe((now - first_sent) / (generated - 1))
                    output_tokens += generated
                    reasons.append(reason)
                yield reply
            span.set_attributes(
                {"gen_ai.usage.output_tokens": output_tokens, "gen_ai.response.finish_reasons": reasons}
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequest(exc.details()) from None
            log.error("request %s: scheduler failed: %s %s", request_id, exc.code().name, exc.details())
            raise SchedulerUnavailable(f"scheduler: {exc.code().name}: {exc.details()}") from None
        except SchedulerGone as exc:
            log.error("request %s: %s", request_id, exc)
            raise SchedulerUnavailable(str(exc)) from None
        finally:
            job.ticket.close()
            span.end()
            self.in_flight.pop(key, None)
            for job_id in job_ids:
                self.job_owners.pop(job_id, None)
            if replies is not None:
                await replies.aclose()  # stops the completions' relays first
            for stream in streams:
                await stream.aclose()  # the client went away: the scheduler drops the job

    async def _relay(
        self,
        request_id: str,
        job_id: str,
        index: int,
        call,
        prompt_len: int,
        sampling: common_pb2.ResolvedSampling,
        usage_always: bool,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """One completion's stream: text deltas, logprobs, and the final message with the outcome."""
        text = TextStream(self.tokenizer, tuple(sampling.stop), sampling.include_stop_str_in_output)
        completion = 0

        def message(reply, token_ids, delta: str, **final) -> pb.GenerateResponse:
            out = pb.GenerateResponse(
                request_id=request_id,
                index=index,
                token_ids=token_ids,
                text=delta,
                logprobs=reply.logprobs,
                prompt_logprobs=reply.prompt_logprobs,
                **final,
            )
            if final or usage_always:
                out.usage.CopyFrom(common_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=completion))
            return out

        async for reply in call:
            token_ids = list(reply.token_ids)
            completion += len(token_ids)
            stop_token = reply.stop_reason.WhichOneof("kind") in ("eos", "token_id")
            # vLLM: the text of the EOS / stop token that ended generation is left out unless asked for
            shown = token_ids[:-1] if stop_token and not sampling.include_stop_str_in_output else token_ids
            delta = text.add(shown) if shown else ""
            if text.stopped:
                await self.scheduler.Abort(
                    scheduler_pb2.AbortRequest(request_id=job_id, reason=FR.FINISH_REASON_STOP)
                )
                yield message(
                    reply,
                    token_ids,
                    delta,
                    finish_reason=FR.FINISH_REASON_STOP,
                    stop_reason=common_pb2.StopReason(text=text.matched),
                )
                return
            if reply.finish_reason:
                delta += text.finish()
                final = {"finish_reason": reply.finish_reason, "error": reply.error}
                if reply.HasField("stop_reason"):
                    final["stop_reason"] = reply.stop_reason
                if text.stopped:
                    final.update(
                        finish_reason=FR.FINISH_REASON_STOP,
                        stop_reason=common_pb2.StopReason(text=text.matched),
                    )
                yield message(reply, token_ids, delta, **final)
                return
            if token_ids or reply.prompt_logprobs:
                yield message(reply, token_ids, delta)
        yield message(
            scheduler_pb2.SubmitResponse(),
            [],
            text.finish(),
            finish_reason=FR.FINISH_REASON_ERROR,
            error="the scheduler closed the stream before the request finished",
        )


def job_ids_of(request_id: str, n: int) -> list[str]:
    """Each completion is its own job to the scheduler: the request's id when n = 1, else id-index."""
    return [request_id] if n == 1 else [f"{request_id}-{i}" for i in range(n)]


def finish_reason_name(reason: int) -> str:
    """FINISH_REASON_LENGTH -> 'length'."""
    return FR.Name(reason).removeprefix("FINISH_REASON_").lower()


async def merge(streams: list[AsyncIterator[pb.GenerateResponse]]) -> AsyncIterator[pb.GenerateResponse]:
    """The messages of several streams as they come (one stream: itself, no tasks)."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream: AsyncIterator[pb.GenerateResponse]) -> None:
        try:
            async for item in stream:
                await queue.put(item)
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put(exc)
        finally:
            await queue.put(done)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
