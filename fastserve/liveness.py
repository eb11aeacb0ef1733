"""Liveness for `fastserve up`: a child that is alive but answers nothing is hung, and is killed.

A frozen process (SIGSTOP, a deadlock) neither serves nor dies, so restarting what died never
catches it. A background thread asks every gRPC child's health service about once a second; any answer
(SERVING or NOT_SERVING: a scheduler waiting for its workers is alive) counts. A child that has
answered since its (re)start and then stays silent for the hang timeout (the scheduler's
--step-timeout plus HANG_MARGIN, so the scheduler, which watches its steps, declares a hung peer
first and the supervisor is the backstop) is reported hung; the supervisor kills it and restarts
it like a child that died.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fastserve.internal_auth import METADATA_KEY
from fastserve.rpc import LIVENESS_SERVICE
from fastserve.v1 import scheduler_pb2, scheduler_pb2_grpc

HANG_MARGIN = 2.0  # seconds past the step timeout before a silent child is killed


def scheduler_step_timeout(address: str, token: str) -> float:
    """The scheduler's --step-timeout as it derived it (seconds), from its Info."""
    with grpc.insecure_channel(address) as chan:
        info = scheduler_pb2_grpc.SchedulerStub(chan).Info(
            scheduler_pb2.SchedulerInfoRequest(), metadata=((METADATA_KEY, token),), timeout=30
        )
    return info.step_timeout_seconds


class Liveness:
    """Last health answer of each child (by pid, so a restarted child starts unjudged).

    A probe is sent once a second to each child with none outstanding, and may take up to the hang
    timeout to come back: on a loaded machine an answer can be seconds late, and a late answer is
    still an answer. Only silence longer than the timeout is a hang."""

    def __init__(self, targets: Callable[[], dict[str, tuple[int, str]]], step_timeout: float) -> None:
        self.targets = targets  # name -> (pid, gRPC address) of each child to watch, now
        self.step_timeout = step_timeout
        self.timeout = step_timeout + HANG_MARGIN
        self.answered: dict[str, tuple[int, float]] = {}
        self._channels: dict[str, grpc.Channel] = {}
        self._probing: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            while not self._stop.wait(1.0):
                for name, (pid, address) in self.targets().items():
                    if name not in self._probing:
                        self._probe(name, pid, address)
        finally:
            for chan in self._channels.values():
                chan.close()

    def _probe(self, name: str, pid: int, address: str) -> None:
        chan = self._channels.get(address)
        if chan is None:
            chan = self._channels[address] = grpc.insecure_channel(address)
        self._probing.add(name)
        call = health_pb2_grpc.HealthStub(chan).Check.future(
            health_pb2.HealthCheckRequest(service=LIVENESS_SERVICE), timeout=self.timeout
        )

        def done(future: grpc.Future) -> None:
            self._probing.discard(name)
            error = future.exception()
            # SERVING or not, or even refusing the call: the process answered; only silence (a
            # deadline) or no listener (starting, or dead: the supervisor sees that) is no answer
            if error is None or error.code() not in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,
            ):
                self.answered[name] = (pid, time.monotonic())

        call.add_done_callback(done)

    def hung(self, name: str, pid: int) -> float:
        """Seconds child `name` (process `pid`) has been silent when past the timeout, else 0."""
        seen = self.answered.get(name)
        if seen is None or seen[0] != pid:
            return 0.0  # not answered yet since it (re)started: still starting
        silent = time.monotonic() - seen[1]
        return silent if silent > self.timeout else 0.0
