"""The KV manager service: plans where every job's KV blocks live, iteration by iteration."""

from __future__ import annotations

import argparse
import asyncio
import logging

import grpc

from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.rpc import create_server, start_server
from fastserve.v1 import kvmanager_pb2 as pb
from fastserve.v1 import kvmanager_pb2_grpc as pb_grpc

from .block_manager import BlockManager

log = logging.getLogger("fastserve.kvmanager")


class KVManagerService(pb_grpc.KVManagerServicer):
    def __init__(self) -> None:
        self.blocks: BlockManager | None = None
        self.num_host_blocks = 0

    async def Configure(
        self, request: pb.ConfigureRequest, context: grpc.aio.ServicerContext
    ) -> pb.ConfigureResponse:
        try:
            manager = BlockManager(request.num_gpu_blocks, request.block_size or 16)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if self.blocks is not None and self.blocks.tables:
            log.warning(
                "reconfigured while %d jobs held blocks; their blocks are forgotten", len(self.blocks.tables)
            )
        self.blocks = manager
        self.num_host_blocks = request.num_host_blocks
        log.info(
            "configured: %d GPU blocks, %d host blocks, block size %d",
            request.num_gpu_blocks,
            request.num_host_blocks,
            manager.block_size,
        )
        return pb.ConfigureResponse()

    async def Plan(self, request: pb.PlanRequest, context: grpc.aio.ServicerContext) -> pb.PlanResponse:
        if self.blocks is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "KV manager is not configured yet (Configure first)"
            )
        reply = pb.PlanResponse()
        for demand in request.batch:
            table = self.blocks.allocate(demand.request_id, demand.num_tokens)
            if table is None:
                reply.deferred.append(demand.request_id)
            else:
                reply.tables.add(request_id=demand.request_id, blocks=table)
        reply.free_gpu_blocks = self.blocks.num_free
        return reply

    async def Free(self, request: pb.FreeRequest, context: grpc.aio.ServicerContext) -> pb.FreeResponse:
        if self.blocks is None:
            return pb.FreeResponse()
        for request_id in request.request_ids:
            self.blocks.free(request_id)
        return pb.FreeResponse(free_gpu_blocks=self.blocks.num_free)

    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.KVStats:
        if self.blocks is None:
            return pb.KVStats()
        return pb.KVStats(
            num_gpu_blocks=self.blocks.num_gpu_blocks,
            num_host_blocks=self.num_host_blocks,
            free_gpu_blocks=self.blocks.num_free,
            num_jobs=len(self.blocks.tables),
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fastserve kvmanager", description="FastServe KV manager service")
    add_flag(
        parser, "--host", default="127.0.0.1", help="address to listen on", env="FASTSERVE_KVMANAGER_HOST"
    )
    add_flag(parser, "--port", default=50053, help="port to listen on", env="FASTSERVE_KVMANAGER_PORT")
    add_common_flags(parser)
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    server = create_server()
    pb_grpc.add_KVManagerServicer_to_server(KVManagerService(), server)
    state, address = await start_server(
        server, [pb.DESCRIPTOR.services_by_name["KVManager"].full_name], args.host, args.port
    )
    await state.mark_serving()
    log.info("listening on %s", address)
    await server.wait_for_termination()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "kvmanager")
    asyncio.run(serve(args))
    return 0
