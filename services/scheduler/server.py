"""The scheduler service: owns the iteration loop and the scheduling policy."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator

import grpc
import redis.exceptions

from fastserve import tracing
from fastserve.flags import add_common_flags, add_flag, parse_auto_bool, setup_logging
from fastserve.metrics import serve_metrics, set_model_name
from fastserve.model_spec import resolve_model
from fastserve.rpc import (
    ServingState,
    channel,
    create_server,
    start_server,
    use_internal_token,
    wait_serving,
)
from fastserve.store import JobLog, RequestStore
from fastserve.v1 import common_pb2, kvmanager_pb2
from fastserve.v1 import scheduler_pb2 as pb
from fastserve.v1 import scheduler_pb2_grpc as pb_grpc
from fastserve.v1.kvmanager_pb2_grpc import KVManagerStub

from . import metrics, resume
from .core import CoreConfig, EnstEstimator, SchedulerCore
from .engine import Engine
from .lease import Leases
from .length_predictor import LengthPredictor
from .policy import (
    MLFQ,
    POLICIES,
    BatchLimits,
    CostModel,
    PolicyConfig,
    make_policy,
    needs_prediction,
    policy_help,
    swap_policy_of,
)
from .profiler import profile
from .recovery import Recovery
from .workers import WorkerGroup

log = logging.getLogger("fastserve.scheduler")

STOPPING = "the scheduler is stopping; its unfinished jobs wait in Redis for the next one"
STEP_TIMEOUT_FLOOR = 30.0  # seconds: longer than a pause that costs nothing (GC, a swapped-out page)
STEP_TIMEOUT_FACTOR = 50.0  # times the longest profiled iteration


class SchedulerService(pb_grpc.SchedulerServicer):
    """Registered before the server starts; answers UNAVAILABLE until `ready` hands it the engine."""

    def __init__(self) -> None:
        self.engine: Engine | None = None
        self.job_log: JobLog | None = None
        self.leases: Leases | None = None
        self.info = pb.SchedulerInfo()
        self.stopping = False  # a stop that keeps the work: closing streams must not abort jobs

    def ready(self, engine: Engine, job_log: JobLog, leases: Leases, info: pb.SchedulerInfo) -> None:
        self.engine, self.job_log, self.leases, self.info = engine, job_log, leases, info

    async def _require_engine(self, context: grpc.aio.ServicerContext) -> Engine:
        if self.engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is still connecting to its workers")
        return self.engine

    async def Submit(
        self, request: pb.SubmitRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubmitResponse]:
        engine = await self._require_engine(context)
        if self.stopping:
            await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
        tokens = list(request.generated_token_ids)
        live = engine.jobs.get(request.request_id) if request.resume else None
        if live is not None:  # a gateway re-attaching to a job this scheduler still runs
            yield resume.attach(engine, live, tokens)
        else:
            problem = self._check(request)
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            parked = self.leases.claim(request.request_id)  # restored from Redis, waiting for its gateway
            reason = resume.ended(request, tokens, self.info.eos_token_id)
            if reason:  # everything was generated before the outage; only the end was missing
                if parked is not None:
                    resume.record_ended(self.job_log, request.request_id, tokens, reason)
                yield resume.final_message(request, tokens, reason)
                return
            if parked is not None and request.resume:
                live, opening = resume.claim(engine, self.job_log, parked, request, tokens)
                yield opening
            else:
                live = resume.take_on(engine, self.job_log, request, tokens)
                if request.resume:
                    yield pb.SubmitResponse(first_index=len(tokens))
        outbox = live.outbox
        try:
            while True:
                message = await outbox.get()
                if message is None:  # `close_streams`: the job stays, for the next scheduler
                    await context.abort(grpc.StatusCode.UNAVAILABLE, STOPPING)
                yield message
                if message.finish_reason:
                    return
        finally:
            # the gateway went away: the job leaves (unless this scheduler stops and leaves it to the next)
            if not live.finished and live.outbox is outbox and not self.stopping:
                engine.abort(request.request_id)

    def close_streams(self) -> None:
        """A stop that keeps the work: every job's stream ends UNAVAILABLE now (its gateway re-attaches
        to the next scheduler) instead of being cancelled under the server's stop."""
        self.stopping = True
        for live in self.engine.jobs.values():
            live.outbox.put_nowait(None)

    def _check(self, request: pb.SubmitRequest) -> str:
        if not request.request_id:
            return "request_id: must not be empty"
        if request.request_id in self.engine.jobs:
            return f"request_id: {request.request_id!r} is already in flight"
        if not request.prompt_token_ids:
            return "prompt_token_ids: must not be empty"
        max_tokens = request.sampling.max_tokens
        if max_tokens < 1:
            return "sampling.max_tokens: must be >= 1"
        if len(request.generated_token_ids) > max_tokens:
            return f"generated_token_ids: {len(request.generated_token_ids)} tokens is more than sampling.max_tokens"
        total = len(request.prompt_token_ids) + max_tokens
        if total > self.info.max_model_len:
            return f"prompt ({len(request.prompt_token_ids)} tokens) + sampling.max_tokens ({max_tokens}) = {total} exceeds max_model_len {self.info.max_model_len}"
        bad = next(
            (
                t
                for t in [*request.prompt_token_ids, *request.generated_token_ids]
                if t >= self.info.vocab_size
            ),
            None,
        )
        if bad is not None:
            return f"prompt_token_ids: {bad} is outside the vocabulary [0, {self.info.vocab_size})"
        return ""

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        engine = await self._require_engine(context)
        reason = request.reason or common_pb2.FINISH_REASON_CANCELLED
        if self.leases.cancel(request.request_id, "aborted while parked"):
            return pb.AbortResponse(found=True)
        return pb.AbortResponse(found=engine.abort(request.request_id, reason))

    async def Info(
        self, request: pb.SchedulerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.SchedulerInfo:
        engine = await self._require_engine(context)
        info = pb.SchedulerInfo()
        info.CopyFrom(self.info)
        info.num_running = sum(1 for j in engine.jobs.values() if j.state == "running")
        info.num_waiting = len(engine.jobs) - info.num_running + len(self.leases.parked)
        info.iterations = engine.iterations
        info.degraded = self.job_log.problem
        return info


def overlap_steps(setting: str, device: str) -> bool:
    """--async-scheduling: "auto" overlaps steps with GPU workers only. There the scheduler's work
    for the next step runs while the GPU computes this one. A CPU worker's step takes every core:
    the same work takes a core from it instead, and an arrival waits behind the step already
    queued. On the 2-core machine, with 2 worker threads, the ShareGPT trace at 1 / 3 req/s had a
    mean TTFT of 214 / 367 ms without overlap against 248 / 491 ms with it, TPOT 37 / 87 against
    38 / 94 ms (docs/benchmarks.md)."""
    if setting == "auto":
        return device.startswith("cuda")
    return setting == "true"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve scheduler", description="FastServe scheduler service", allow_abbrev=False
    )
    add_flag(
        parser, "--host", default="127.0.0.1", help="address to listen on", env="FASTSERVE_SCHEDULER_HOST"
    )
    add_flag(parser, "--port", default=50052, help="port to listen on", env="FASTSERVE_SCHEDULER_PORT")
    add_flag(
        parser,
        "--worker-addresses",
        default="127.0.0.1:50060",
        help="comma-separated worker ranks, rank order",
    )
    add_flag(parser, "--kvmanager-address", default="127.0.0.1:50053", help="the KV manager")
    add_flag(parser, "--redis-url", default="redis://127.0.0.1:6379/0", help="Redis for request metadata")
    add_flag(parser, "--request-ttl", default=86400, help="seconds a request's Redis record is kept")
    add_flag(
        parser,
        "--job-log-interval",
        default=0.02,
        help="seconds between two writes of the job log to Redis (iterations faster than this share a write; "
        "a client's tokens are never lost by it: the gateway re-attaches with the ones it forwarded)",
    )
    add_flag(
        parser,
        "--orphan-timeout",
        default=30.0,
        help="seconds a job restored after a restart waits for a gateway to re-attach before it is "
        "cancelled (longer than a scheduler restart plus a gateway's re-attach)",
    )
    add_flag(
        parser,
        "--step-timeout",
        default=0.0,
        help="seconds a worker step or a KV plan may go unanswered before that peer is declared hung "
        f"(NOT_SERVING; the supervisor restarts it); 0 = {STEP_TIMEOUT_FACTOR:g}x the longest profiled "
        f"iteration, at least {STEP_TIMEOUT_FLOOR:g}s",
    )
    add_flag(
        parser,
        "--keep-work-on-stop",
        default=False,
        help="on SIGTERM, leave unfinished jobs in Redis for the next scheduler (under --orphan-timeout) "
        "instead of cancelling them; the job log is flushed either way",
    )
    add_flag(parser, "--policy", default="skip-join-mlfq", help=policy_help(), choices=sorted(POLICIES))
    add_flag(
        parser,
        "--base-quantum",
        default=0.0,
        help="quantum of Q0 in seconds; 0 = one profiled decode iteration",
    )
    add_flag(parser, "--quantum-ratio", default=2.0, help="q_i = base * ratio^i")
    add_flag(parser, "--num-queues", default=16, help="MLFQ queue count")
    add_flag(
        parser,
        "--starvation-threshold",
        default=PolicyConfig.starvation_threshold,
        help="α: seconds without running before promotion to Q0 (default SLO 0.3 s/token x 338 tokens)",
    )
    add_flag(parser, "--starvation-period", default=1000, help="iterations between starvation checks")
    add_flag(
        parser,
        "--length-predictor",
        default="",
        help="output-length model (.npz, bench/length_predictor.py) read from each prompt's token ids; "
        "the predicted-* policies need one",
    )
    # defaults measured against vLLM-CPU on the ShareGPT trace (docs/benchmarks.md, "Batch limits and
    # chunked prefill"); `fastserve up --max-num-seqs` repeats the first, the other two it passes on when given
    add_flag(
        parser, "--max-batch-size", default=128, help="most jobs in one iteration (vLLM: --max-num-seqs)"
    )
    add_flag(parser, "--max-num-batched-tokens", default=512, help="most tokens fed in one iteration")
    add_flag(
        parser,
        "--stream-interval",
        default=1,
        help="a job's tokens are streamed this many at a time (its first at once, its last with the "
        "outcome): larger values cut per-token work in the scheduler, gateway and client, smoother "
        "streams come with 1 (as vLLM's --stream-interval)",
    )
    add_flag(
        parser,
        "--enable-chunked-prefill",
        default=True,
        help="split a prefill that does not fit the tokens left under --max-num-batched-tokens into chunks "
        "run in successive iterations beside the decodes (jobs asking prompt logprobs, penalties or "
        "structured outputs prefill whole)",
    )
    add_flag(
        parser, "--served-model-name", default="", help="model_name label of the metrics; empty = the model"
    )
    add_flag(
        parser, "--max-model-len", default=0, help="most tokens (prompt + output) of one job; 0 = the model's"
    )
    add_flag(
        parser, "--connect-timeout", default=600.0, help="seconds to wait for workers and the KV manager"
    )
    add_flag(
        parser,
        "--swap-policy",
        default="proactive",
        help="KV swapping: proactive, reactive, recompute",
        choices=["proactive", "reactive", "recompute"],
    )
    add_flag(
        parser,
        "--swap-order",
        default="enst",
        help="which idle jobs swap first: enst or priority",
        choices=["enst", "priority"],
    )
    add_flag(
        parser,
        "--async-scheduling",
        default="auto",
        type=parse_auto_bool,
        const="true",
        help="auto (on with GPU workers, off with CPU ones), true or false: send a job's next step "
        "before its last token is back (the workers keep it); without pipeline parallelism",
    )
    add_flag(
        parser,
        "--kv-reserve-blocks",
        default=-1,
        help="free GPU blocks proactive swapping keeps; -1 = 5%% of the pool",
    )
    add_flag(
        parser,
        "--metrics-port",
        default=9101,
        help="Prometheus /metrics port; 0 = off",
        env="FASTSERVE_SCHEDULER_METRICS_PORT",
    )
    add_common_flags(parser)
    tracing.add_tracing_flags(parser)
    args = parser.parse_args(argv)
    if args.max_batch_size < 1:
        parser.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if args.max_num_batched_tokens < 1:
        parser.error(f"--max-num-batched-tokens must be >= 1, got {args.max_num_batched_tokens}")
    if args.stream_interval < 1:
        parser.error(f"--stream-interval must be >= 1, got {args.stream_interval}")
    if needs_prediction(args.policy) and not args.length_predictor:
        parser.error(
            f"--policy {args.policy} needs --length-predictor (a model from bench/length_predictor.py)"
        )
    args.swap_policy = swap_policy_of(args.policy, args.swap_policy)  # a preset (vllm) fixes its own
    return args


async def serve(args: argparse.Namespace) -> None:
    serve_metrics(args.host, args.metrics_port)
    tracer = tracing.setup_tracing("scheduler", args)
    server = create_server()
    service = SchedulerService()
    pb_grpc.add_SchedulerServicer_to_server(service, server)
    service_name = pb.DESCRIPTOR.services_by_name["Scheduler"].full_name
    state, address = await start_server(server, [service_name], args.host, args.port)
    log.info("listening on %s (NOT_SERVING until workers and KV manager answer)", address)

    store = RequestStore(args.redis_url, args.request_ttl)
    await wait_for_redis(store, args.connect_timeout)
    log.info("connected to Redis at %s", store.address)
    kv_channel = channel(args.kvmanager_address)
    await wait_serving(kv_channel, args.kvmanager_address, args.connect_timeout)
    kv = KVManagerStub(kv_channel)
    log.info("connected to KV manager at %s", args.kvmanager_address)
    workers = WorkerGroup([a.strip() for a in args.worker_addresses.split(",") if a.strip()])
    await workers.connect(args.connect_timeout)

    first = workers.infos[0]
    limits = BatchLimits(
        max_batch_size=args.max_batch_size,
        max_batched_tokens=args.max_num_batched_tokens,
        chunked_prefill=args.enable_chunked_prefill,
    )
    core_config = CoreConfig(
        num_gpu_blocks=workers.num_gpu_blocks,
        num_host_blocks=workers.num_host_blocks,
        limits=limits,
        block_size=first.block_size,
        swap_policy=args.swap_policy,
        reserve_blocks=args.kv_reserve_blocks,
        pp_size=first.pp_size,
        overlap=overlap_steps(args.async_scheduling, first.device),
        eos_token_id=first.eos_token_id,
    )
    configure = kvmanager_pb2.ConfigureRequest(
        num_gpu_blocks=core_config.num_gpu_blocks,
        num_host_blocks=core_config.host_blocks,
        block_size=core_config.block_size,
        swap_policy=args.swap_policy,
        reserve_blocks=core_config.reserve,
    )
    await kv.Configure(configure)
    samples = await profile(
        workers,
        block_size=first.block_size,
        num_blocks=workers.num_gpu_blocks,
        max_len=min(first.max_positions, workers.num_gpu_blocks * first.block_size),
        max_batch_size=args.max_batch_size,
        max_batched_tokens=args.max_num_batched_tokens,
    )
    cost_model = CostModel().fit(samples)
    step_timeout = args.step_timeout or max(
        STEP_TIMEOUT_FLOOR, STEP_TIMEOUT_FACTOR * max((sample[-1] for sample in samples), default=0.0)
    )
    predictor = LengthPredictor.load(args.length_predictor) if args.length_predictor else None
    if predictor is not None:
        log.info(
            "length predictor %s: %s ids, sigma %.2f",
            args.length_predictor,
            predictor.tokenizer,
            predictor.sigma,
        )
    policy = make_policy(
        PolicyConfig(
            name=args.policy,
            base_quantum=args.base_quantum or None,  # None: one decode iteration of the fitted cost model
            quantum_ratio=args.quantum_ratio,
            num_queues=args.num_queues,
            starvation_threshold=args.starvation_threshold,
            starvation_period=args.starvation_period,
            extra={"prediction_sigma": predictor.sigma} if predictor else {},
        ),
        cost_model,
    )
    log.info("cost model: %s", {k: f"{v:.3g}" for k, v in cost_model.to_dict().items()})
    log.info(
        "async scheduling %s (--async-scheduling %s, workers on %s)",
        "on" if core_config.overlap else "off",
        args.async_scheduling,
        first.device,
    )
    if isinstance(policy, MLFQ):
        log.info(
            "%s: quanta %.4fs x %g^i over %d queues; starvation α %gs, checked every %d iterations",
            args.policy,
            policy.base,
            args.quantum_ratio,
            args.num_queues,
            args.starvation_threshold,
            args.starvation_period,
        )
    enst = EnstEstimator(
        args.max_batch_size,
        getattr(policy, "starvation_threshold", None),
        getattr(policy, "quantum", None),
        by=args.swap_order,
    )
    core = SchedulerCore(core_config, policy, enst)
    job_log = JobLog(store, min_interval=args.job_log_interval)
    job_log.start()
    leases = Leases(job_log, args.orphan_timeout)
    metrics.JOB_LOG_DEGRADED.set_function(lambda: 1.0 if job_log.problem else 0.0)
    engine = Engine(
        core,
        workers,
        kv,
        job_log,
        cost_model,
        first.kv_block_bytes,
        tracer,
        stream_interval=args.stream_interval,
    )
    engine.predictor = predictor.predict if predictor else None
    engine.kv.timeout = step_timeout
    recovery = Recovery(engine, workers, kv_channel, args.kvmanager_address, configure, state)
    info = pb.SchedulerInfo(
        model=first.model,
        dtype=first.dtype,
        device=first.device,
        policy=args.policy,
        tensor_parallel_size=first.tp_size,
        pipeline_parallel_size=first.pp_size,
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=first.block_size,
        num_gpu_blocks=workers.num_gpu_blocks,
        num_host_blocks=workers.num_host_blocks,
        vocab_size=first.vocab_size,
        max_model_len=min(
            first.max_positions,
            workers.num_gpu_blocks * first.block_size,
            args.max_model_len or first.max_positions,
        ),
        eos_token_id=first.eos_token_id,
        tokenizer=resolve_model(first.model).tokenizer,
        swap_policy=args.swap_policy,
        step_timeout_seconds=step_timeout,
    )
    try:
        restored = await resume.restore(engine, job_log, store, leases)
    except redis.exceptions.RedisError as exc:  # away again, or refusing: serve without the old jobs
        log.error(
            "cannot read unfinished jobs from Redis at %s (%s); serving without them", store.address, exc
        )
        restored = 0
    if restored:
        log.warning(
            "%d unfinished jobs from Redis wait for their gateways to re-attach "
            "(cancelled after --orphan-timeout %gs); each recomputes its KV",
            restored,
            args.orphan_timeout,
        )
    set_model_name(args.served_model_name or info.model)
    service.ready(engine, job_log, leases, info)
    loop_task = asyncio.create_task(engine.run())
    watch_task = asyncio.create_task(recovery.watch_kvmanager(hung_after=step_timeout))
    steps_task = asyncio.create_task(workers.watch_steps(step_timeout))
    lease_task = asyncio.create_task(leases.run())
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    stop_task = asyncio.create_task(stop.wait())
    await state.mark_serving()
    log.info(
        "serving: policy %s, max batch %d, max batched tokens %d%s, max model len %d, step timeout %.1fs",
        args.policy,
        args.max_batch_size,
        args.max_num_batched_tokens,
        " (chunked prefill)" if args.enable_chunked_prefill else "",
        info.max_model_len,
        step_timeout,
    )
    done, _ = await asyncio.wait(
        [
            loop_task,
            watch_task,
            steps_task,
            lease_task,
            stop_task,
            asyncio.create_task(server.wait_for_termination()),
        ],
        return_when=asyncio.FIRST_COMPLETED,
    )
    for task in done:
        task.result()  # a crashed loop must take the service down loudly
    if stop_task in done:
        await stop_serving(service, server, state, loop_task, keep_work=args.keep_work_on_stop)


async def stop_serving(
    service: SchedulerService,
    server: grpc.aio.Server,
    state: ServingState,
    loop_task: asyncio.Task,
    keep_work: bool,
) -> None:
    """A clean stop (SIGTERM/SIGINT): cancels every job (or, keeping the work, leaves the unfinished
    ones in Redis for the next scheduler) and writes the job log before exiting, so a job that
    finished just before the stop says `finished` and none is left to regenerate for nobody."""
    engine, leases, job_log = service.engine, service.leases, service.job_log
    await state.mark_not_serving()
    log.warning(
        "stopping: %s %d jobs",
        "leaving to the next scheduler" if keep_work else "cancelling",
        len(engine.jobs),
    )
    if keep_work:  # no further iteration: what Redis gets is where the next scheduler picks up
        loop_task.cancel()
        await asyncio.wait([loop_task], timeout=5.0)
        service.close_streams()
    else:
        for request_id in list(leases.parked):
            leases.cancel(request_id, "the scheduler stopped")
        for request_id in list(engine.jobs):
            engine.abort(request_id)
        deadline = time.monotonic() + 5.0
        while engine.jobs and time.monotonic() < deadline:  # a job in a step finishes when it returns
            await asyncio.sleep(0.02)
    engine.write_store()
    if not await job_log.flushed(timeout=5.0):
        log.error("stopping with job records unwritten: Redis at %s takes no writes", job_log.store.address)
    await server.stop(grace=1.0)


async def wait_for_redis(store: RequestStore, timeout: float) -> None:
    """A scheduler starting while Redis restarts waits for it: the unfinished jobs are there. A Redis
    that answers but refuses writes (MISCONF refuses even PING) is as good as it gets: serve."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            await store.ping()
            return
        except redis.exceptions.ResponseError as exc:
            log.warning("Redis at %s answers but refuses writes (%s); serving degraded", store.address, exc)
            return
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise SystemExit(f"Redis at {store.address} unreachable for {timeout:.0f}s: {exc}") from None
            log.warning("waiting for Redis at %s: %s", store.address, exc)
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "scheduler")
    use_internal_token(args.internal_token)
    asyncio.run(serve(args))
    return 0
