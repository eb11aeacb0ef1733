"""The KV manager service: plans where every job's KV blocks live, iteration by iteration."""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator

import grpc
from prometheus_client import REGISTRY

from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.metrics import serve_metrics
from fastserve.rpc import create_server, start_server, use_internal_token
from fastserve.v1 import kvmanager_pb2 as pb
from fastserve.v1 import kvmanager_pb2_grpc as pb_grpc

from .block_manager import BlockManager
from .metrics import KVCollector
from .planner import SWAP_POLICIES, make_plan

log = logging.getLogger("fastserve.kvmanager")


class KVManagerService(pb_grpc.KVManagerServicer):
    def __init__(self) -> None:
        self.blocks: BlockManager | None = None
        self.swap_policy = "proactive"
        self.reserve = 0
        self.counters = {"out": 0, "in": 0, "recompute": 0}

    async def _configured(self, context: grpc.aio.ServicerContext) -> BlockManager:
        if self.blocks is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "KV manager is not configured yet (Configure first)"
            )
        return self.blocks

    async def Configure(
        self, request: pb.ConfigureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfigureResponse:
        swap_policy = request.swap_policy or "proactive"
        try:
            if swap_policy not in SWAP_POLICIES:
                raise ValueError(f"swap_policy: {swap_policy!r} is not one of {', '.join(SWAP_POLICIES)}")
            manager = BlockManager(request.num_gpu_blocks, request.block_size or 16, request.num_host_blocks)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.blocks is not None and (self.blocks.tables or self.blocks.host_tables):
            log.warning("reconfigured while jobs held blocks; their blocks are forgotten")
        self.blocks, self.swap_policy, self.reserve = manager, swap_policy, request.reserve_blocks
        log.info(
            "configured: %d GPU blocks, %d host blocks, block size %d, swap policy %s, reserve %d",
            request.num_gpu_blocks,
            request.num_host_blocks,
            manager.block_size,
            swap_policy,
            self.reserve,
        )
        return pb.ConfigureResponse()

    async def Plan(
        self, request_iterator: AsyncIterator[pb.PlanRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PlanResponse]:
        await self._configured(context)
        log.info("scheduler opened a plan stream from %s", context.peer())
        async for request in request_iterator:
            yield self._answer(request)

    def _answer(self, request: pb.PlanRequest) -> pb.PlanResponse:
        blocks = self.blocks
        for request_id in request.free:
            blocks.free(request_id)
        if not request.batch:
            return pb.PlanResponse(free_gpu_blocks=blocks.num_free, free_host_blocks=blocks.num_host_free)
        # blocks of a job's GPU table the scheduler already has: tables only grow while they stay
        # on the GPU, so these are still its first blocks (a job on the host gets its table whole)
        held = {
            d.request_id: d.held_blocks
            for d in request.batch
            if 0 < d.held_blocks <= len(blocks.tables.get(d.request_id, ()))
        }
        plan = make_plan(
            blocks,
            [(d.request_id, d.num_tokens) for d in request.batch],
            [(w.request_id, w.enst) for w in request.waiting],
            self.swap_policy,
            self.reserve,
        )
        self.counters["out"] += len(plan.swap_out)
        self.counters["in"] += len(plan.swap_in) + len(plan.prefetch)
        self.counters["recompute"] += len(plan.recompute)
        copy = pb.BlockCopy
        tables = [
            pb.BlockTable(request_id=rid, blocks=table[held.get(rid, 0) :], offset=held.get(rid, 0))
            for rid, table in plan.tables.items()
        ]
        return pb.PlanResponse(
            tables=tables,
            deferred=plan.deferred,
            swap_in=[copy(src=s, dst=d) for s, d in plan.swap_in],
            swap_out=[copy(src=s, dst=d) for s, d in plan.swap_out],
            prefetch=[copy(src=s, dst=d) for s, d in plan.prefetch],
            swapped_in=plan.swapped_in,
            swapped_out=plan.swapped_out,
            recompute=plan.recompute,
            free_gpu_blocks=blocks.num_free,
            free_host_blocks=blocks.num_host_free,
        )

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.KVStats:
        if self.blocks is None:
            return pb.KVStats()
        b = self.blocks
        return pb.KVStats(
            num_gpu_blocks=b.num_gpu_blocks,
            num_host_blocks=b.host.size,
            free_gpu_blocks=b.num_free,
            free_host_blocks=b.num_host_free,
            num_jobs=len(b.tables) + len(b.host_tables),
            blocks_swapped_out=self.counters["out"],
            blocks_swapped_in=self.counters["in"],
            recomputes=self.counters["recompute"],
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve kvmanager", description="FastServe KV manager service", allow_abbrev=False
    )
    add_flag(
        parser, "--host", default="127.0.0.1", help="address to listen on", env="FASTSERVE_KVMANAGER_HOST"
    )
    add_flag(parser, "--port", default=50053, help="port to listen on", env="FASTSERVE_KVMANAGER_PORT")
    add_flag(
        parser,
        "--metrics-port",
        default=9102,
        help="Prometheus /metrics port; 0 = off",
        env="FASTSERVE_KVMANAGER_METRICS_PORT",
    )
    add_flag(parser, "--served-model-name", default="", help="model_name label of the metrics")
    add_common_flags(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    service = KVManagerService()
    REGISTRY.register(KVCollector(lambda: service.blocks, args.served_model_name))
    serve_metrics(args.host, args.metrics_port)
    server = create_server()
    pb_grpc.add_KVManagerServicer_to_server(service, server)
    state, address = await start_server(
        server, [pb.DESCRIPTOR.services_by_name["KVManager"].full_name], args.host, args.port
    )
    await state.mark_serving()
    log.info("listening on %s", address)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "kvmanager")
    use_internal_token(args.internal_token)
    asyncio.run(serve(args))
    return 0
