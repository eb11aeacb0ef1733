"""The worker service: one rank (one TP shard of one PP stage) of the model.

The scheduler holds one bidirectional Step stream per rank. Steps run one at a time
in arrival order on a single thread, which is what keeps pipeline stages in step:
every rank sees the same sequence of steps.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch
from opentelemetry import trace

from fastserve import tracing
from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.metrics import serve_metrics
from fastserve.model_spec import ModelSpec, resolve_model
from fastserve.rpc import create_server, start_server, use_internal_token
from fastserve.v1 import common_pb2
from fastserve.v1 import worker_pb2 as pb
from fastserve.v1 import worker_pb2_grpc as pb_grpc

from . import metrics
from .cpu_share import ThreadGovernor
from .cuda_graphs import parse_sizes
from .peer_watch import wait_for_fresh_world, watch_peers
from .swapper import Swapper

log = logging.getLogger("fastserve.worker")


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if name not in table:
        raise SystemExit(f"--dtype {name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def kv_block_budget(args: argparse.Namespace, spec: ModelSpec, dtype, device: str, parallel) -> int:
    """KV blocks this rank can hold: --num-gpu-blocks, else a share of free device memory
    (called once the weights are loaded, so on a GPU what they take is no longer free)."""
    from .runner import ModelRunner

    if args.num_gpu_blocks > 0:
        return args.num_gpu_blocks
    per_block = ModelRunner.kv_bytes_per_block(
        spec, dtype, args.block_size, parallel.tp_size if parallel else 1, parallel.pp_size if parallel else 1
    )
    if device.startswith("cuda"):
        import torch

        free, total = torch.cuda.mem_get_info()
        budget = free - (1 - args.gpu_memory_utilization) * total
    else:
        budget = args.cpu_kv_cache_gib * 2**30
    blocks = int(budget // per_block)
    if blocks < 1:
        raise SystemExit(
            f"no memory left for the KV cache ({budget / 2**30:.2f} GiB for blocks of {per_block} bytes); "
            "raise --gpu-memory-utilization / --cpu-kv-cache-gib or set --num-gpu-blocks"
        )
    return blocks


def host_block_budget(swap_space_gib: float, bytes_per_block: int) -> int:
    """Host KV blocks for --swap-space; refuses more than this machine's memory."""
    import psutil

    if swap_space_gib < 0:
        raise SystemExit(f"--swap-space must be >= 0 GiB, got {swap_space_gib}")
    total = psutil.virtual_memory().total
    if swap_space_gib * 2**30 > total:
        raise SystemExit(
            f"--swap-space {swap_space_gib} GiB is larger than this machine's memory "
            f"({total / 2**30:.1f} GiB)"
        )
    return int(swap_space_gib * 2**30 // bytes_per_block)


def position_logprobs(lp) -> common_pb2.PositionLogprobs:
    return common_pb2.PositionLogprobs(
        token_id=lp.token_id,
        logprob=lp.logprob,
        rank=lp.rank,
        top=[common_pb2.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
    )


def seq_logprobs(out) -> list[pb.SeqLogprobs]:
    """The StepOutput's logprobs, one message per seq that has any."""
    return [
        pb.SeqLogprobs(
            seq_index=i,
            sampled=position_logprobs(out.logprobs[i]) if i in out.logprobs else None,
            prompt_logprobs=[position_logprobs(lp) for lp in out.prompt_logprobs.get(i, [])],
        )
        for i in sorted(out.logprobs.keys() | out.prompt_logprobs.keys())
    ]


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, args: argparse.Namespace, tracer: trace.Tracer) -> None:
        self.args = args
        self.tracer = tracer
        self.runner = None
        self.swapper: Swapper | None = None
        self.info = pb.WorkerInfo()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step")
        self.kept: dict[str, tuple[list[int], object]] = {}  # per job: block table, sampling
        self.steps_done = 0
        self.governor: ThreadGovernor | None = None  # on CPU with --adaptive-threads, set by load()

    def load(self) -> None:
        """Joins the torch.distributed world (when there is one), loads the shard and allocates the KV pool."""
        import torch

        from .runner import ModelRunner
        from .tp import init_distributed

        args = self.args
        if args.num_gpu_blocks < 0:  # refused before minutes of loading weights
            raise SystemExit(
                f"--num-gpu-blocks must be >= 0 (0 sizes the pool from memory), got {args.num_gpu_blocks}"
            )
        device = args.device if args.device != "auto" else default_device()
        dtype = resolve_dtype(args.dtype, device)
        spec = resolve_model(args.model)
        parallel = None
        if args.world_size > 1:
            wait_for_fresh_world(
                args.rank, args.world_size, args.master_addr, args.master_port, args.peer_timeout
            )
            parallel = init_distributed(
                args.rank, args.world_size, args.tp, args.pp, args.master_addr, args.master_port
            )
            watch_peers(args.rank, args.world_size, args.master_addr, args.master_port, args.peer_timeout)
            log.info(
                "joined torch.distributed world %d as rank %d (tp=%d, pp=%d) via %s:%d",
                args.world_size,
                args.rank,
                args.tp,
                args.pp,
                args.master_addr,
                args.master_port,
            )
        if device.startswith("cuda") and parallel is not None:
            device = (
                f"cuda:{args.local_rank if args.local_rank >= 0 else args.rank % torch.cuda.device_count()}"
            )
        started = time.perf_counter()
        self.runner = ModelRunner(
            spec,
            dtype=dtype,
            device=device,
            num_gpu_blocks=lambda: kv_block_budget(args, spec, dtype, device, parallel),
            block_size=args.block_size,
            parallel=parallel,
            seed=args.seed,
            enforce_eager=args.enforce_eager,
            cpu_attention=args.cpu_attention,
            # on CPU a padded step only costs: graphs are for CUDA
            cuda_graph_sizes=args.cuda_graph_sizes if device.startswith("cuda") else (),
        )
        log.info(
            "loaded %s (%s, %s) in %.1fs; KV pool %d blocks of %d tokens",
            spec.name,
            dtype,
            device,
            time.perf_counter() - started,
            self.runner.num_blocks,
            args.block_size,
        )
        if device == "cpu" and args.adaptive_threads:
            self.governor = ThreadGovernor(torch.get_num_threads())
        per_block = ModelRunner.kv_bytes_per_block(spec, dtype, args.block_size, args.tp, args.pp)
        num_host_blocks = args.num_host_blocks or host_block_budget(args.swap_space, per_block)
        if num_host_blocks:
            self.swapper = Swapper(self.runner.kv, num_host_blocks)
            log.info(
                "host KV pool: %d blocks (%.2f GiB%s)",
                num_host_blocks,
                num_host_blocks * per_block / 2**30,
                ", pinned" if self.swapper.cuda else "",
            )
        self.info = pb.WorkerInfo(
            model=spec.name,
            dtype=str(dtype).removeprefix("torch."),
            device=device,
            rank=args.rank,
            world_size=args.world_size,
            tp_size=args.tp,
            pp_size=args.pp,
            is_driver=self.runner.is_driver,
            num_gpu_blocks=self.runner.num_blocks,
            num_host_blocks=num_host_blocks,
            kv_block_bytes=per_block,
            block_size=args.block_size,
            vocab_size=spec.vocab_size,
            max_positions=spec.max_positions,
            eos_token_id=spec.eos_token_id,
        )

    async def Info(self, request: pb.WorkerInfoRequest, context: grpc.aio.ServicerContext) -> pb.WorkerInfo:
        return self.info

    def _expand(self, request: pb.StepRequest) -> list:
        """The step's jobs in full: what a SeqStep leaves out (sampling, blocks already sent) is kept here."""
        from .runner import SeqWork
        from .sampling import from_resolved

        eos = self.info.eos_token_id
        for rid in request.finished:
            self.kept.pop(rid, None)
        self.runner.forget(list(request.finished))
        seqs = []
        for s in request.seqs:
            kept = self.kept.get(s.request_id)
            if s.HasField("sampling"):
                sampling = from_resolved(s.sampling, eos)
                if sampling.structured is not None and self.runner.grammars is not None:
                    self.runner.grammars.compile(sampling.structured)  # starts now, beside the step
            elif kept is not None:
                sampling = kept[1]
            else:
                raise ValueError(f"{s.request_id}: no sampling sent and none kept from an earlier step")
            table = list(s.block_table)
            if s.table_offset:
                if kept is None or len(kept[0]) < s.table_offset:
                    raise ValueError(f"{s.request_id}: table_offset {s.table_offset} but fewer blocks kept")
                table = kept[0][: s.table_offset] + table
            self.kept[s.request_id] = (table, sampling)
            seqs.append(
                SeqWork(
                    request_id=s.request_id,
                    token_ids=list(s.token_ids),
                    start_pos=s.start_pos,
                    block_table=table,
                    sampling=sampling,
                    sample_index=s.sample_index,
                    partial=s.partial,
                )
            )
        return seqs

    def _run_step(self, request: pb.StepRequest) -> pb.StepResponse:
        links = [
            trace.Link(
                trace.get_current_span(tracing.extract({"traceparent": s.traceparent})).get_span_context()
            )
            for s in request.seqs
            if s.traceparent
        ]
        started = time.perf_counter()
        swap_before = self.swapper.totals() if self.swapper else (0.0, 0.0)
        with self.tracer.start_as_current_span(
            "fastserve.worker.step",
            context=tracing.extract(request.trace_context),
            links=links,
            attributes={
                "fastserve.rank": self.args.rank,
                "fastserve.step_id": request.step_id,
                "fastserve.batch_size": len(request.seqs),
            },
        ) as span:
            try:
                seqs = self._expand(request)
                if self.swapper is not None:
                    self.swapper.submit(
                        [(m.src, m.dst) for m in request.swap_out],
                        [(m.src, m.dst) for m in request.swap_in],
                        [(m.src, m.dst) for m in request.prefetch],
                    )
                    self.swapper.wait_for({b for s in seqs for b in s.block_table})
                elif request.swap_out or request.swap_in or request.prefetch:
                    raise RuntimeError("swap orders for a worker without a host KV pool (--swap-space 0)")
                if self.governor is not None:  # on the step thread: torch's thread count is per thread
                    self.governor.apply()
                decode_only = bool(seqs) and all(len(s.token_ids) <= 1 and not s.partial for s in seqs)
                run_started = time.perf_counter()
                out = self.runner.run(seqs) if seqs else None
                if decode_only:
                    metrics.DECODE_STEP_SECONDS.observe(time.perf_counter() - run_started)
            except Exception as exc:  # a bad step fails its jobs, not the worker
                log.exception("step %d failed", request.step_id)
                span.set_status(trace.StatusCode.ERROR, str(exc))
                return pb.StepResponse(step_id=request.step_id, error=f"{type(exc).__name__}: {exc}")
        self.steps_done += 1
        compute_seconds = time.perf_counter() - started
        # on CUDA: the swap time the GPU has timed by now (this step's transfers, if not yet, count later)
        transfer, exposed = self.swapper.totals() if self.swapper else (0.0, 0.0)
        return pb.StepResponse(
            step_id=request.step_id,
            token_ids=out.tokens if out else [],
            logprobs=seq_logprobs(out) if out else [],
            compute_seconds=compute_seconds,
            exposed_swap_seconds=exposed - swap_before[1],
            swap_seconds=transfer - swap_before[0],
        )

    async def Step(
        self, request_iterator: AsyncIterator[pb.StepRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepResponse]:
        loop = asyncio.get_running_loop()
        log.info("scheduler opened a step stream from %s", context.peer())
        self.kept.clear()  # a new scheduler (or a reconnect) sends every job in full again
        if self.runner is not None:
            self.runner.forget_all()
        # steps go to the (single) step thread as they arrive, so one queued behind the running one
        # starts the moment it ends; answers go back in order
        queued: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queued.put_nowait(loop.run_in_executor(self.executor, self._run_step, request))
            finally:
                queued.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (answer := await queued.get()) is not None:
                yield await answer
        finally:
            reader.cancel()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve worker", description="FastServe worker: one model shard", allow_abbrev=False
    )
    add_flag(parser, "--host", default="127.0.0.1", help="address to listen on", env="FASTSERVE_WORKER_HOST")
    add_flag(parser, "--port", default=50060, help="port to listen on", env="FASTSERVE_WORKER_PORT")
    add_flag(parser, "--model", default="opt-tiny", help="preset name, checkpoint directory or hub id")
    add_flag(
        parser, "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16"
    )
    add_flag(parser, "--device", default="auto", help="auto (cuda when present), cpu, cuda")
    add_flag(parser, "--block-size", default=16, help="tokens per KV block")
    add_flag(parser, "--num-gpu-blocks", default=0, help="KV blocks in the device pool; 0 = size from memory")
    add_flag(
        parser, "--gpu-memory-utilization", default=0.9, help="fraction of GPU memory the worker may fill"
    )
    add_flag(
        parser, "--num-host-blocks", default=0, help="KV blocks in the host pool; 0 = size from --swap-space"
    )
    add_flag(
        parser, "--swap-space", default=4.0, help="GiB of host memory for swapped-out KV blocks; 0 = none"
    )
    add_flag(parser, "--cpu-kv-cache-gib", default=1.0, help="KV pool size on CPU when --num-gpu-blocks is 0")
    add_flag(
        parser, "--rank", default=0, help="this worker's rank in the torch.distributed world", env="RANK"
    )
    add_flag(
        parser,
        "--local-rank",
        default=-1,
        help="GPU index on this node; -1 = rank modulo GPUs",
        env="LOCAL_RANK",
    )
    add_flag(parser, "--world-size", default=1, help="ranks in the world = tp * pp", env="WORLD_SIZE")
    add_flag(parser, "--tp", default=1, help="tensor-parallel size")
    add_flag(parser, "--pp", default=1, help="pipeline-parallel size")
    add_flag(
        parser, "--master-addr", default="127.0.0.1", help="rendezvous address of rank 0", env="MASTER_ADDR"
    )
    add_flag(parser, "--master-port", default=29500, help="rendezvous port of rank 0", env="MASTER_PORT")
    add_flag(
        parser,
        "--peer-timeout",
        default=10.0,
        help="seconds a peer rank may go silent before this rank exits (status 75) so that restart "
        "policies re-form the world; 0 = never",
    )
    add_flag(parser, "--seed", default=0, help="seed for dummy weights and unseeded sampling")
    add_flag(
        parser,
        "--adaptive-threads",
        default=True,
        help="on CPU, run a step on fewer threads while other processes keep this worker's CPUs "
        "busy (read from /proc/stat every 0.5 s), back to --num-threads when they leave them free",
    )
    add_flag(
        parser,
        "--preload-libs",
        default="auto",
        help="on CPU, runtime libraries loaded before torch (LD_PRELOAD; the worker starts itself again "
        "once to apply it): auto = Intel OpenMP (the intel-openmp wheel) and tcmalloc, those found "
        "(without tcmalloc, glibc's allocator keeps freed memory), none, or a colon-separated list",
    )
    add_flag(
        parser,
        "--cpu-attention",
        default="cpp",
        choices=["cpp", "torch"],
        help="decode attention on CPU (fp32): cpp = a C++ kernel reading the paged KV pool in place, "
        "compiled at start-up (~30 s the first time, then cached; the torch path if it cannot be "
        "built), torch = gather the blocks and run SDPA",
    )
    add_flag(
        parser,
        "--num-threads",
        default=0,
        help="torch CPU threads of this rank; 0 = torch's default (one per core). The most a step "
        "uses: with --adaptive-threads it uses fewer while other processes keep the CPUs busy",
    )
    add_flag(
        parser,
        "--enforce-eager",
        default=False,
        help="run the reference path: plain F.linear (no oneDNN-prepacked weights on CPU), no compiled "
        "parts, no CUDA graphs. Slower; for checking the fast path against",
    )
    add_flag(
        parser,
        "--cuda-graph-sizes",
        default="1,2,4,8,16,24,32,48,64",
        type=parse_sizes,
        help="decode batch sizes captured as CUDA graphs (a batch replays the smallest that holds it; "
        "larger batches and prefills run eagerly); empty = none. GPU, tp = pp = 1 only",
    )
    add_flag(
        parser,
        "--metrics-port",
        default=9103,
        help="Prometheus /metrics port; 0 = off",
        env="FASTSERVE_WORKER_METRICS_PORT",
    )
    add_common_flags(parser)
    tracing.add_tracing_flags(parser)
    args = parser.parse_args(argv)
    if args.tp * args.pp != args.world_size:
        parser.error(f"--world-size {args.world_size} must equal --tp {args.tp} x --pp {args.pp}")
    if not 0 <= args.rank < args.world_size:
        parser.error(f"--rank {args.rank} must be in [0, {args.world_size})")
    return args


async def serve(args: argparse.Namespace) -> None:
    serve_metrics(args.host, args.metrics_port)
    service = WorkerService(args, tracing.setup_tracing("worker", args))
    server = create_server()
    pb_grpc.add_WorkerServicer_to_server(service, server)
    state, address = await start_server(
        server, [pb.DESCRIPTOR.services_by_name["Worker"].full_name], args.host, args.port
    )
    log.info("listening on %s (NOT_SERVING until the model is loaded)", address)
    started = time.perf_counter()
    await asyncio.get_running_loop().run_in_executor(service.executor, service.load)
    metrics.LOAD_SECONDS.set(time.perf_counter() - started)
    metrics.KV_BLOCKS.labels("gpu").set(service.info.num_gpu_blocks)
    metrics.KV_BLOCKS.labels("host").set(service.info.num_host_blocks)
    await state.mark_serving()
    log.info("rank %d serving %s on %s", args.rank, args.model, address)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, f"worker{args.rank}")
    use_internal_token(args.internal_token)
    if args.num_threads > 0:
        torch.set_num_threads(args.num_threads)
    log.info(
        "torch uses %d CPU threads (OMP_WAIT_POLICY=%s, GOMP_SPINCOUNT=%s, KMP_BLOCKTIME=%s, adaptive: %s; "
        "LD_PRELOAD=%s)",
        torch.get_num_threads(),
        os.environ.get("OMP_WAIT_POLICY", "unset"),
        os.environ.get("GOMP_SPINCOUNT", "unset"),
        os.environ.get("KMP_BLOCKTIME", "unset"),
        args.adaptive_threads,
        os.environ.get("LD_PRELOAD", "") or "none",
    )
    asyncio.run(serve(args))
    return 0
