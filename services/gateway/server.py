"""The gateway service: the public fastserve.v1.Gateway API.

Validates, tokenizes, records the request in Redis, hands it to the scheduler on a
stream of its own and turns the tokens coming back into text deltas.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import grpc

from fastserve import tracing
from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.metrics import serve_metrics, set_model_name
from fastserve.rpc import channel, create_server, start_server, use_internal_token, wait_serving
from fastserve.store import RequestStore, StoreUnavailable
from fastserve.tokenizer import load_tokenizer
from fastserve.v1 import common_pb2, scheduler_pb2
from fastserve.v1 import gateway_pb2 as pb
from fastserve.v1 import gateway_pb2_grpc as pb_grpc

from . import metrics
from .admission import Admission, Overloaded
from .api_keys import ApiKeyInterceptor, ApiKeys, authorization, parse_keys
from .extra_routes import encode, fastserve_version
from .generation import Generations, SchedulerUnavailable
from .http_limits import guarded_h11
from .ids import scoped, unscoped
from .memory import freeze_startup_objects, release_memory_periodically
from .openai_api import HttpSettings, create_app
from .request_info import read_request
from .scheduler_link import SchedulerLink
from .validation import InvalidRequest, Limits, check_prompt_chars, check_token

log = logging.getLogger("fastserve.gateway")
FR = common_pb2.FinishReason


class GatewayService(pb_grpc.GatewayServicer):
    def __init__(self, generations: Generations, store: RequestStore, keys: ApiKeys) -> None:
        self.generations = generations
        self.store = store
        self.keys = keys
        self.info = generations.info
        self.limits = generations.limits

    def _owner(self, context: grpc.aio.ServicerContext) -> str:
        return self.keys.owner(authorization(context.invocation_metadata()))

    def _may_see(self, owner: str, context: grpc.aio.ServicerContext) -> bool:
        """With API keys, a request answers only to the key that made it."""
        return not self.keys.required or owner == self._owner(context)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            job = self.generations.prepare(request, self._owner(context))
            async for reply in self.generations.stream(job):
                yield reply
        except InvalidRequest as exc:
            metrics.REJECTED.labels("invalid").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Overloaded as exc:
            metrics.REJECTED.labels("overloaded").inc()
            context.set_trailing_metadata((("retry-after", str(exc.retry_after)),))
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except SchedulerUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        """Cancels every completion of the request. One this gateway streams is known here; any
        other (another gateway's, or one from before a restart) is looked up in Redis."""
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        request_id = scoped(self._owner(context), request.request_id)
        live = self.generations.in_flight.get(request_id)
        if live is not None:
            job_ids, owner = live.job_ids, live.owner
        else:
            try:
                stored = await read_request(self.store, request_id)
            except StoreUnavailable as exc:
                if self.keys.required:  # the owner cannot be checked
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again shortly")
                stored = None
            job_ids, owner = (stored.job_ids, stored.owner) if stored else ([request_id], "")
        if not self._may_see(owner, context):
            return pb.CancelResponse(cancelled=False)
        try:
            return pb.CancelResponse(cancelled=await self.generations.cancel(job_ids))
        except SchedulerUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    async def _records_behind(self) -> str:
        """Why the scheduler's job log cannot write Redis right now ('' when it can, or when the
        scheduler is away): Redis may take this gateway's reads and writes and still hold stale
        records (the scheduler cut off from it, or not caught up yet after a full disk)."""
        try:
            info = await self.generations.scheduler.Info(scheduler_pb2.SchedulerInfoRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return ""
        return info.degraded

    async def GetRequest(
        self, request: pb.GetRequestRequest, context: grpc.aio.ServicerContext
    ) -> pb.RequestInfo:
        if not request.request_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "request_id: must not be empty")
        owner = self._owner(context)
        try:
            stored = await read_request(self.store, scoped(owner, request.request_id))
        except StoreUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; try again shortly")
        if behind := await self._records_behind():
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, f"request records are behind: {behind}; try again shortly"
            )
        if stored is None or not self._may_see(stored.owner, context):
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"request_id: no record of {request.request_id!r} (records expire after --request-ttl)",
            )
        info = stored.info  # as the client knows its ids
        info.request_id = request.request_id
        for completion in info.completions:
            completion.request_id = unscoped(owner, completion.request_id)
        return info

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
            version=fastserve_version(),
        )

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        limits = self.generations.limits
        try:
            check_prompt_chars("text", len(request.text), limits)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        special = request.add_special_tokens if request.HasField("add_special_tokens") else True
        ids = encode(self.generations.tokenizer, request.text, special)
        return pb.TokenizeResponse(token_ids=ids, max_model_len=limits.max_model_len)

    async def Detokenize(
        self, request: pb.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetokenizeResponse:
        try:
            for i, token in enumerate(request.token_ids):
                check_token(f"token_ids[{i}]", token, self.generations.limits)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.DetokenizeResponse(text=self.generations.tokenizer.decode(list(request.token_ids)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve gateway",
        description="FastServe gateway: the public gRPC API and the OpenAI-compatible HTTP API",
        allow_abbrev=False,
    )
    add_flag(
        parser,
        "--host",
        default="127.0.0.1",
        help="address of the public ports (gRPC, HTTP, metrics); loopback like every FastServe service and "
        "`fastserve up` (vLLM binds every interface): 0.0.0.0 exposes them, give --api-key and TLS first",
        env="FASTSERVE_GATEWAY_HOST",
    )
    add_flag(parser, "--port", default=50051, help="gRPC port to listen on")
    add_flag(parser, "--http-port", default=8000, help="OpenAI-compatible HTTP port; 0 = off")
    add_flag(parser, "--served-model-name", default="", help="model name of the HTTP API; empty = the model")
    add_flag(
        parser,
        "--api-key",
        default="",
        help="comma-separated API keys the public ports require; empty = open",
    )
    add_flag(parser, "--ssl-certfile", default="", help="TLS certificate (PEM) for both public ports")
    add_flag(parser, "--ssl-keyfile", default="", help="TLS private key (PEM) for both public ports")
    add_flag(parser, "--scheduler-address", default="127.0.0.1:50052", help="the scheduler")
    add_flag(parser, "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for request metadata")
    add_flag(parser, "--request-ttl", default=86400, help="seconds a request's Redis record is kept")
    add_flag(
        parser,
        "--tokenizer",
        default="auto",
        help="auto (the model's), byte, or a Hugging Face tokenizer; "
        "another than the model's refuses structured outputs (the workers constrain with the model's)",
    )
    add_flag(parser, "--max-tokens-limit", default=2048, help="largest sampling.max_tokens accepted")
    add_flag(
        parser,
        "--max-request-bytes",
        default=1 << 20,
        help="largest GenerateRequest (each prompt of an HTTP request is one) accepted once parsed, in bytes: "
        "gRPC INVALID_ARGUMENT, HTTP 400; --max-request-body-bytes bounds what is read before it",
    )
    add_flag(
        parser,
        "--max-request-body-bytes",
        default=4 << 20,
        help="largest request body read: HTTP 413 past it (refused while reading, before parsing), gRPC "
        "RESOURCE_EXHAUSTED (the transport's grpc.max_receive_message_length)",
    )
    add_flag(
        parser,
        "--max-prompt-chars",
        default=0,
        help="longest prompt (all chat messages together) in characters, refused before tokenizing; "
        "0 = 32 x the model's max length in tokens",
    )
    add_flag(
        parser,
        "--max-num-waiting",
        default=1024,
        help="admission: most requests waiting for their first token (the scheduler's queue and this "
        "gateway's own); past it HTTP 429 + Retry-After / gRPC RESOURCE_EXHAUSTED; 0 = no bound",
    )
    add_flag(
        parser,
        "--max-concurrent-requests",
        default=4096,
        help="admission (TGI's name): most requests this gateway streams at once; past it 429; 0 = no bound",
    )
    add_flag(
        parser,
        "--http-header-timeout",
        default=10.0,
        help="HTTP: seconds a connection may take to send a request's headers (and, apart, its body); "
        "then it is closed (headers) or answered 408 (body)",
    )
    add_flag(
        parser,
        "--timeout-keep-alive",
        default=5.0,
        help="HTTP: seconds an idle keep-alive connection stays open (uvicorn's name)",
    )
    add_flag(
        parser,
        "--stream-send-timeout",
        default=30.0,
        help="HTTP: a stream whose client reads nothing for this many seconds (its send buffer full) is "
        "cancelled, and its job with it",
    )
    add_flag(parser, "--max-stop-strings", default=16, help="most sampling.stop strings in one request")
    add_flag(
        parser, "--max-logprobs", default=20, help="largest sampling.logprobs / prompt_logprobs accepted"
    )
    add_flag(parser, "--max-n", default=16, help="largest sampling.n (completions per request) accepted")
    add_flag(
        parser,
        "--max-prompts-per-request",
        default=64,
        help="most prompts in one /v1/completions request (a list of strings or of token-id lists)",
    )
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
    args = parser.parse_args(argv)
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    return args


def bind_http(host: str, port: int) -> socket.socket:
    """The HTTP port, bound before anything starts: a busy one stops the gateway at once, named."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"cannot listen on {host}:{port} (--host/--http-port): {exc.strerror or 'address in use'}"
        ) from None
    sock.set_inheritable(True)
    return sock


async def serve_http(app, args: argparse.Namespace, sock: socket.socket) -> None:
    import uvicorn

    def timed_out() -> None:
        metrics.REJECTED.labels("timeout").inc()

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="off",
        http=guarded_h11(args.http_header_timeout, timed_out),
        timeout_keep_alive=max(1, round(args.timeout_keep_alive)),
        ssl_certfile=args.ssl_certfile or None,
        ssl_keyfile=args.ssl_keyfile or None,
        timeout_graceful_shutdown=2,
    )
    await uvicorn.Server(config).serve(sockets=[sock])


async def poll_queue(
    link: SchedulerLink, admission: Admission, period: float = 0.2, idle_period: float = 2.0
) -> None:
    """Keeps admission's view of the scheduler's queue depth (SchedulerInfo.num_waiting) current:
    every `period` while this gateway has requests in flight or the scheduler had a queue, every
    `idle_period` otherwise (an idle server's polls were most of its idle CPU; a burst arriving at an
    idle gateway is bounded by the gateway's own count until the next poll)."""
    loop = asyncio.get_running_loop()
    asked = -idle_period
    while True:
        if admission.in_flight or admission.scheduler_waiting or loop.time() - asked >= idle_period:
            asked = loop.time()
            try:
                info = await link.stub.Info(scheduler_pb2.SchedulerInfoRequest(), timeout=5)
                admission.scheduler_waiting = info.num_waiting
            except grpc.aio.AioRpcError:
                admission.scheduler_waiting = 0  # away: the gateway's own count still bounds the queue
        await asyncio.sleep(period)


def tls_credentials(certfile: str, keyfile: str) -> grpc.ServerCredentials | None:
    if not certfile:
        return None
    with open(keyfile, "rb") as key, open(certfile, "rb") as cert:
        return grpc.ssl_server_credentials([(key.read(), cert.read())])


async def serve(args: argparse.Namespace) -> None:
    http_sock = bind_http(args.host, args.http_port) if args.http_port else None
    serve_metrics(args.host, args.metrics_port)
    tracer = tracing.setup_tracing("gateway", args)
    sched_channel = channel(args.scheduler_address)
    await wait_serving(sched_channel, args.scheduler_address, args.connect_timeout)
    link = SchedulerLink(sched_channel, args.scheduler_retry_timeout)
    try:
        info = await link.stub.Info(scheduler_pb2.SchedulerInfoRequest())
    except grpc.aio.AioRpcError as exc:  # e.g. UNAUTHENTICATED: this gateway lacks the stack's token
        raise SystemExit(
            f"gateway: the scheduler at {args.scheduler_address} refused Info: {exc.code().name}: {exc.details()}"
        ) from None
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
    structured_refused = (
        f"not served with this gateway's --tokenizer {args.tokenizer!r}: the workers constrain tokens "
        f"with the model's tokenizer ({info.tokenizer!r})"
        if args.tokenizer not in ("auto", info.tokenizer)
        else ""
    )
    if structured_refused:
        log.warning("structured outputs are refused: %s", structured_refused)
    limits = Limits(
        vocab_size=info.vocab_size,
        max_model_len=info.max_model_len,
        max_tokens_limit=args.max_tokens_limit,
        max_request_bytes=args.max_request_bytes,
        max_stop_strings=args.max_stop_strings,
        max_logprobs=args.max_logprobs,
        max_n=args.max_n,
        max_prompts_per_request=args.max_prompts_per_request,
        max_prompt_chars=args.max_prompt_chars or 32 * info.max_model_len,
        structured_outputs_refused=structured_refused,
    )

    served_model_name = args.served_model_name or info.model
    set_model_name(served_model_name)
    keys = ApiKeys(parse_keys(args.api_key))
    tls = tls_credentials(args.ssl_certfile, args.ssl_keyfile)
    server = create_server(
        max_receive_bytes=args.max_request_body_bytes,
        public=True,
        interceptors=[ApiKeyInterceptor(keys)] if keys.required else None,
    )
    admission = Admission(args.max_num_waiting, args.max_concurrent_requests)
    generations = Generations(link, tokenizer, info, limits, tracer, admission)
    pb_grpc.add_GatewayServicer_to_server(GatewayService(generations, store, keys), server)
    state, address = await start_server(
        server, [pb.DESCRIPTOR.services_by_name["Gateway"].full_name], args.host, args.port, tls
    )
    log.info(
        "gRPC listening on %s (%s; API keys %s)",
        address,
        "TLS" if tls else "plaintext",
        "required" if keys.required else "off",
    )
    tasks = [
        asyncio.ensure_future(server.wait_for_termination()),
        asyncio.ensure_future(link.watch_health(state)),  # SERVING while the scheduler is
        asyncio.ensure_future(poll_queue(link, admission)),
        asyncio.ensure_future(release_memory_periodically()),
    ]
    if http_sock is not None:
        settings = HttpSettings(
            max_request_body_bytes=args.max_request_body_bytes,
            header_timeout=args.http_header_timeout,
            stream_send_timeout=args.stream_send_timeout,
        )
        app = create_app(generations, served_model_name, keys, lambda: state.serving, settings)
        tasks.append(asyncio.ensure_future(serve_http(app, args, http_sock)))
        scheme = "https" if tls else "http"
        log.info(
            "OpenAI-compatible HTTP on %s://%s:%d/v1 (model %r)",
            scheme,
            args.host,
            args.http_port,
            served_model_name,
        )
    else:
        log.info("HTTP off (--http-port 0)")
    freeze_startup_objects()
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    for task in done:
        task.result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "gateway")
    use_internal_token(args.internal_token)
    asyncio.run(serve(args))
    return 0
