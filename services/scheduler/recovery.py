"""The scheduler through a worker-group or kvmanager restart: NOT_SERVING, jobs held, then back.

While a rank or the kvmanager is away no iteration starts and no job fails: they wait. When the
group is SERVING again (the launcher restarts a TP x PP group as a whole) the scheduler opens fresh
step streams, configures the kvmanager anew (a restarted one knows no block tables), treats every
job's KV as lost (each one recomputes from prompt + tokens) and says SERVING again.
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.rpc import ServingState, wait_serving
from fastserve.v1 import kvmanager_pb2
from fastserve.v1.kvmanager_pb2_grpc import KVManagerStub

from .engine import Engine
from .workers import WorkerGroup

log = logging.getLogger("fastserve.scheduler.recovery")


class Recovery:
    def __init__(
        self,
        engine: Engine,
        workers: WorkerGroup,
        kv_channel: grpc.aio.Channel,
        kv_address: str,
        configure: kvmanager_pb2.ConfigureRequest,
        state: ServingState,
    ) -> None:
        self.engine, self.workers, self.state = engine, workers, state
        self.kv_channel, self.kv_address = kv_channel, kv_address
        self.kv = KVManagerStub(kv_channel)
        self.configure = configure
        self.recoveries = 0
        engine.recover = self.recover
        workers.on_broken = engine.wakeup.set

    async def recover(self) -> None:
        started = time.monotonic()
        reason = self.engine._outage()
        log.warning("NOT_SERVING: %s; %d jobs wait", reason, len(self.engine.jobs))
        await self.state.mark_not_serving()
        if self.workers.broken is not None:
            await self.workers.reconnect()
        await self._configure_kv()
        self.engine.forget_kv()
        self.recoveries += 1
        await self.state.mark_serving()
        log.warning(
            "SERVING again after %.2fs; %d jobs recompute their KV",
            time.monotonic() - started,
            len(self.engine.jobs),
        )

    async def _configure_kv(self) -> None:
        while True:
            try:
                await wait_serving(self.kv_channel, self.kv_address, timeout=30.0)
                await self.kv.Configure(self.configure, timeout=10.0)
                log.info("KV manager at %s configured anew", self.kv_address)
                return
            except (TimeoutError, grpc.aio.AioRpcError) as exc:
                log.warning("KV manager at %s not back yet: %s", self.kv_address, exc)
                await asyncio.sleep(0.5)

    async def watch_kvmanager(self, period: float = 1.0, misses: int = 3) -> None:
        """Notices a kvmanager that went away while nothing ran (health stays truthful). It takes
        `misses` failed probes in a row, so a slow answer on a loaded machine is not an outage."""
        stub = health_pb2_grpc.HealthStub(self.kv_channel)
        failed = 0
        while True:
            await asyncio.sleep(period)
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2 * period)
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
            except grpc.aio.AioRpcError:
                ok = False
            failed = 0 if ok else failed + 1
            if failed >= misses and not self.engine.kv_lost:
                self.engine.kv_lost = f"kvmanager at {self.kv_address} is not SERVING"
                self.engine.wakeup.set()
