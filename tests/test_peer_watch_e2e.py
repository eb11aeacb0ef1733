"""services/worker/peer_watch.py with real ranks: two processes in a gloo world, one SIGKILLed.

The survivor must leave (exit 75) so that a restart policy can re-form the world.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from fastserve.procs import free_port
from fastserve.services.worker.peer_watch import EXIT_STATUS

RANK = """
import logging, sys, time
logging.basicConfig(level=logging.INFO)
from fastserve.services.worker.peer_watch import wait_for_fresh_world, watch_peers
from fastserve.services.worker.tp import init_distributed
rank, port, timeout = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
wait_for_fresh_world(rank, 2, "127.0.0.1", port, timeout)
print("joining", flush=True)
init_distributed(rank, 2, 2, 1, "127.0.0.1", port, backend="gloo", timeout_s=60)
watch_peers(rank, 2, "127.0.0.1", port, timeout)
print("joined", flush=True)
time.sleep(600)
"""


def rank(r: int, port: int, timeout: float = 3.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RANK, str(r), str(port), str(timeout)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_line(proc: subprocess.Popen, line: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = proc.stdout.readline()
        if out.strip() == line:
            return
        assert out or proc.poll() is None, f"rank exited {proc.poll()}: {proc.stderr.read()[-2000:]}"
    raise AssertionError(f"no {line!r} within {timeout}s")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("victim", [0, 1])
def test_survivor_leaves_when_a_peer_dies(victim):
    port = free_port()
    ranks = [rank(0, port), rank(1, port)]
    try:
        for proc in ranks:
            wait_line(proc, "joined")
        ranks[victim].kill()
        ranks[victim].wait(10)
        survivor = ranks[1 - victim]
        assert survivor.wait(60) == EXIT_STATUS, survivor.stderr.read()[-2000:]
        why = "stopped answering" if victim == 0 else "has not beaten"
        assert why in survivor.stderr.read()
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait(10)
