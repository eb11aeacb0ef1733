"""The gateway service: the public fastserve.v1.Gateway API.

Validates, tokenizes, records the request in Redis, hands it to the scheduler on a
stream of its own and turns the tokens coming back into text deltas.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from fastserve import tracing
from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.metrics import serve_metrics
from fastserve.rpc import channel, create_server, start_server, use_internal_token, wait_serving
from fastserve.store import RequestStore, StoreUnavailable
from fastserve.tokenizer import Tokenizer, load_tokenizer
from fastserve.v1 import common_pb2, scheduler_pb2
from fastserve.v1 import gateway_pb2 as pb
from fastserve.v1 import gateway_pb2_grpc as pb_grpc

from . import metrics
from .scheduler_link import SchedulerGone, SchedulerLink
from .text_stream import TextStream
from .validation import InvalidRequest, Limits, check_envelope, check_length, resolve_sampling

log = logging.getLogger("fastserve.gateway")
FR = common_pb2.FinishReason
VERSION = "0.1.0"


class GatewayService(pb_grpc.GatewayServicer):
    def __init__(
        self,
        link: SchedulerLink,
        store: RequestStore,
        tokenizer: Tokenizer,
        info: scheduler_pb2.SchedulerInfo,
        limits: Limits,
        tracer: trace.Tracer,
    ) -> None:
        self.tracer = tracer
        self.link = link
        self.scheduler = link.stub
        self.store = store
        self.tokenizer = tokenizer
        self.info = info
        self.limits = limits
        self.in_flight: dict[str, list[str]] = {}  # request id -> its completions' job ids

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.time()
        try:
            check_envelope(request, self.limits)
            sampling = resolve_sampling(request, self.limits)
            prompt_ids = list(request.prompt_token_ids) or self.tokenizer.encode(request.prompt)
            check_length(len(prompt_ids), sampling.resolved.max_tokens, self.limits)
            request_id = request.request_id or uuid.uuid4().hex
            if request_id in self.in_flight:
                raise InvalidRequest(f"request_id: {request_id!r} is already in flight")
        except InvalidRequest as exc:
            metrics.REJECTED.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        # Each completion is its own job to the scheduler: the request's id when n = 1, else id-i.
        job_ids = [request_id] if sampling.n == 1 else [f"{request_id}-{i}" for i in range(sampling.n)]
        self.in_flight[request_id] = job_ids
        resolved = sampling.resolved
        streams: list = []
        span = self.tracer.start_span(
            "fastserve.generate",
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": self.info.model,
                "gen_ai.request.max_tokens": resolved.max_tokens,
                "gen_ai.request.temperature": resolved.temperature,
                "gen_ai.request.top_p": resolved.top_p,
                "gen_ai.request.top_k": resolved.top_k,
                "gen_ai.request.choice.count": sampling.n,
                "gen_ai.usage.input_tokens": len(prompt_ids),
                "fastserve.request_id": request_id,
            },
        )
        try:
            trace_context = tracing.inject(trace.set_span_in_context(span))
            streams = [
                self.link.stream(  # the scheduler records the job in Redis
                    scheduler_pb2.SubmitRequest(
                        request_id=job_id,
                        prompt_token_ids=prompt_ids,
                        sampling=sampling.job_sampling(i),
                        arrival_time=arrival,
                        trace_context=trace_context,
                    )
                )
                for i, job_id in enumerate(job_ids)
            ]
            last_sent = None
            output_tokens = 0
            reasons: list[str] = []
            replies = merge(
                [
                    self._relay(
                        request_id,
                        job_id,
                        i,
                        stream,
                        len(prompt_ids),
                        resolved,
                        request.continuous_usage_stats,
                    )
                    for i, (job_id, stream) in enumerate(zip(job_ids, streams, strict=True))
                ]
            )
            async for reply in replies:
                now = time.time()
                if reply.token_ids:
                    metrics.GENERATION_TOKENS.inc(len(reply.token_ids))
                    if last_sent is None:
                        metrics.TTFT.observe(now - arrival)
                        span.add_event("first_token")
                    else:
                        metrics.INTER_TOKEN.observe(now - last_sent)
                    last_sent = now
                if reply.finish_reason:
                    reason = FR.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower()
                    metrics.E2E.observe(now - arrival)
                    metrics.FINISHED.labels(reason).inc()
                    output_tokens += reply.usage.completion_tokens
                    reasons.append(reason)
                yield reply
            span.set_attributes(
                {"gen_ai.usage.output_tokens": output_tokens, "gen_ai.response.finish_reasons": reasons}
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.INVALID_ARGUMENT:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.details())
            log.error("request %s: scheduler failed: %s %s", request_id, exc.code().name, exc.details())
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"scheduler: {exc.code().name}: {exc.details()}")
        except SchedulerGone as exc:
            log.error("request %s: %s", request_id, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        finally:
            span.end()
            self.in_flight.pop(request_id, None)
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

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        """Cancels every completion of the request."""
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        job_ids = self.in_flight.get(request.request_id, [request.request_id])
        replies = await asyncio.gather(
            *(self.scheduler.Abort(scheduler_pb2.AbortRequest(request_id=job_id)) for job_id in job_ids)
        )
        return pb.CancelResponse(cancelled=any(r.found for r in replies))

    async def GetRequest(
        self, request: pb.GetRequestRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestInfo:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        try:
            record = await self.store.read(request.request_id)
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again shortly")
        if record is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no record of {request.request_id!r} (records expire after --request-ttl)",
            )
        fields = {f.name for f in pb.RequestInfo.DESCRIPTOR.fields}
        return pb.RequestInfo(
            request_id=request.request_id, **{k: v for k, v in record.items() if k in fields}
        )

    async def ServerInfo(
        self, request: pb.ServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerInfoResponse:
        i = self.info
        return pb.ServerInfoResponse(
            model=i.model,
            dtype=i.dtype,
            device=i.device,
            policy=i.policy,
            tensor_parallel_size=i.tensor_parallel_size,
            pipeline_parallel_size=i.pipeline_parallel_size,
            max_batch_size=i.max_batch_size,
            max_num_batched_tokens=i.max_num_batched_tokens,
            max_model_len=self.limits.max_model_len,
            max_tokens_limit=self.limits.max_tokens_limit,
            vocab_size=i.vocab_size,
            block_size=i.block_size,
            num_gpu_blocks=i.num_gpu_blocks,
            num_host_blocks=i.num_host_blocks,
            swap_policy=i.swap_policy,
            version=VERSION,
        )


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve gateway", description="FastServe gateway: the public gRPC API"
    )
    add_flag(parser, "--host", default="0.0.0.0", help="address to listen on", env="FASTSERVE_GATEWAY_HOST")
    add_flag(parser, "--port", default=50051, help="port to listen on")
    add_flag(parser, "--scheduler-address", default="127.0.0.1:50052", help="the scheduler")
    add_flag(parser, "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for request metadata")
    add_flag(parser, "--request-ttl", default=86400, help="seconds a request's Redis record is kept")
    add_flag(
        parser, "--tokenizer", default="auto", help="auto (the model's), byte, or a Hugging Face tokenizer"
    )
    add_flag(parser, "--max-tokens-limit", default=2048, help="largest sampling.max_tokens accepted")
    add_flag(
        parser, "--max-request-bytes", default=1 << 20, help="largest GenerateRequest accepted, in bytes"
    )
    add_flag(parser, "--max-stop-strings", default=16, help="most sampling.stop strings in one request")
    add_flag(
        parser, "--max-logprobs", default=20, help="largest sampling.logprobs / prompt_logprobs accepted"
    )
    add_flag(parser, "--max-n", default=16, help="largest sampling.n (completions per request) accepted")
    add_flag(parser, "--connect-timeout", default=600.0, help="seconds to wait for the scheduler")
    add_flag(
        parser,
        "--scheduler-retry-timeout",
        default=600.0,
        help="seconds a client stream waits for a lost scheduler to come back before it fails UNAVAILABLE",
    )
    add_flag(
        parser,
        "--metrics-port",
        default=9100,
        help="Prometheus /metrics port; 0 = off",
        env="FASTSERVE_GATEWAY_METRICS_PORT",
    )
    add_common_flags(parser)
    tracing.add_tracing_flags(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    serve_metrics(args.host, args.metrics_port)
    tracer = tracing.setup_tracing("gateway", args)
    sched_channel = channel(args.scheduler_address)
    await wait_serving(sched_channel, args.scheduler_address, args.connect_timeout)
    link = SchedulerLink(sched_channel, args.scheduler_retry_timeout)
    info = await link.stub.Info(scheduler_pb2.SchedulerInfoRequest())
    log.info(
        "connected to scheduler at %s (model %s, policy %s)", args.scheduler_address, info.model, info.policy
    )
    store = RequestStore(args.redis_url, args.request_ttl)
    try:
        await store.ping()
        log.info("connected to Redis at %s", store.address)
    except Exception as exc:  # noqa: BLE001 - GetRequest answers UNAVAILABLE until it is back
        log.warning(
            "Redis at %s unreachable for now (%s); serving without request metadata", store.address, exc
        )
    tokenizer = load_tokenizer(info.tokenizer if args.tokenizer == "auto" else args.tokenizer)
    limits = Limits(
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_stop_strings=args.max_stop_strings,
        max_logprobs=args.max_logprobs,
        max_n=args.max_n,
    )

    # the transport cap sits above --max-request-bytes so an oversized request gets our message
    server = create_server(max_receive_bytes=4 * args.max_request_bytes + 4096, public=True)
    pb_grpc.add_GatewayServicer_to_server(
        GatewayService(link, store, tokenizer, info, limits, tracer), server
    )
    state, address = await start_server(
        server, [pb.DESCRIPTOR.services_by_name["Gateway"].full_name], args.host, args.port
    )
    log.info("listening on %s", address)
    watch = asyncio.create_task(link.watch_health(state))  # SERVING while the scheduler is
    await server.wait_for_termination()
    watch.cancel()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "gateway")
    use_internal_token(args.internal_token)
    asyncio.run(serve(args))
    return 0
