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
        self.in_flight: set[str] = set()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        arrival = time.time()
        try:
            check_envelope(request, self.limits)
            sampling = resolve_sampling(request, self.limits)
            if sampling.n > 1:
                raise InvalidRequest(f"sampling.n: {sampling.n} is not supported yet (only 1)")
            job_sampling = sampling.job_sampling(0)
            prompt_ids = list(request.prompt_token_ids) or self.tokenizer.encode(request.prompt)
            check_length(len(prompt_ids), job_sampling.max_tokens, self.limits)
            request_id = request.request_id or uuid.uuid4().hex
            if request_id in self.in_flight:
                raise InvalidRequest(f"request_id: {request_id!r} is already in flight")
        except InvalidRequest as exc:
            metrics.REJECTED.inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        self.in_flight.add(request_id)
        stream = None
        span = self.tracer.start_span(
            "fastserve.generate",
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "text_completion",
                "gen_ai.request.model": self.info.model,
                "gen_ai.request.max_tokens": job_sampling.max_tokens,
                "gen_ai.request.temperature": job_sampling.temperature,
                "gen_ai.request.top_p": job_sampling.top_p,
                "gen_ai.request.top_k": job_sampling.top_k,
                "gen_ai.usage.input_tokens": len(prompt_ids),
                "fastserve.request_id": request_id,
            },
        )
        try:
            submit = scheduler_pb2.SubmitRequest(
                request_id=request_id,
                prompt_token_ids=prompt_ids,
                sampling=job_sampling,
                arrival_time=arrival,
                trace_context=tracing.inject(trace.set_span_in_context(span)),
            )
            stream = self.link.stream(submit)  # the scheduler records the request in Redis
            text = TextStream(self.tokenizer, tuple(job_sampling.stop))
            last_sent = None
            async for reply in self._relay(request_id, stream, text, len(prompt_ids)):
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
                    span.set_attributes(
                        {
                            "gen_ai.usage.output_tokens": reply.usage.completion_tokens,
                            "gen_ai.response.finish_reasons": [reason],
                        }
                    )
                yield reply
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
            self.in_flight.discard(request_id)
            if stream is not None:
                await stream.aclose()  # the client went away: the scheduler drops the job

    async def _relay(
        self, request_id: str, call, text: TextStream, prompt_len: int
    ) -> AsyncIterator[pb.GenerateResponse]:
        completion = 0
        async for reply in call:
            completion += len(reply.token_ids)
            delta = text.add(list(reply.token_ids)) if reply.token_ids else ""
            if text.stopped:
                await self.scheduler.Abort(
                    scheduler_pb2.AbortRequest(request_id=request_id, reason=FR.FINISH_REASON_STOP)
                )
                yield self._final(
                    request_id, reply.token_ids, delta, FR.FINISH_REASON_STOP, prompt_len, completion
                )
                return
            if reply.finish_reason:
                delta += text.finish()
                reason = FR.FINISH_REASON_STOP if text.stopped else reply.finish_reason
                yield self._final(
                    request_id, reply.token_ids, delta, reason, prompt_len, completion, reply.error
                )
                return
            if reply.token_ids:
                yield pb.GenerateResponse(request_id=request_id, token_ids=reply.token_ids, text=delta)
        yield self._final(
            request_id,
            [],
            text.finish(),
            FR.FINISH_REASON_ERROR,
            prompt_len,
            completion,
            "the scheduler closed the stream before the request finished",
        )

    @staticmethod
    def _final(
        request_id: str, token_ids, text: str, reason: int, prompt_len: int, completion: int, error: str = ""
    ) -> pb.GenerateResponse:
        return pb.GenerateResponse(
            request_id=request_id,
            token_ids=token_ids,
            text=text,
            finish_reason=reason,
            usage=common_pb2.Usage(prompt_tokens=prompt_len, completion_tokens=completion),
            error=error,
        )

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        reply = await self.scheduler.Abort(scheduler_pb2.AbortRequest(request_id=request.request_id))
        return pb.CancelResponse(cancelled=reply.found)

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
