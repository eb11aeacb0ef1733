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

    async def watch_kvmanager(self, hung_after: float, period: float = 1.0, misses: int = 3) -> None:
        """Notices a kvmanager that went away while nothing ran (health stays truthful). A dead one
        (refusing connections, or NOT_SERVING) takes `misses` failed probes in a row, so a slow answer
        on a loaded machine is not an outage; a frozen one (no answer at all) takes `hung_after`
        seconds (--step-timeout), so a pause shorter than that costs no reconfigure and no recompute."""
        stub = health_pb2_grpc.HealthStub(self.kv_channel)
        failed = 0
        answered = time.monotonic()
        while True:
            await asyncio.sleep(period)
            silent = False
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2 * period)
                ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                answered = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                ok = False
                silent = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            failed = 0 if ok or silent else failed + 1
            hung = silent and time.monotonic() - answered >= hung_after
            if (failed >= misses or hung) and not self.engine.kv_lost:
                self.engine.kv_lost = (
                    f"kvmanager at {self.kv_address} hung: no answer for {hung_after:g}s (--step-timeout)"
                    if hung
                    else f"kvmanager at {self.kv_address} is not SERVING"
                )
                self.engine.wakeup.set()
