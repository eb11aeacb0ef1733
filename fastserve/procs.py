"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

PR_SET_PDEATHSIG = 1


def popen_child(args: list[str], **kwargs) -> subprocess.Popen:
    """Popen whose child gets SIGTERM when this process dies, even by SIGKILL.

    The child starts through `python -m fastserve.procs`, which sets PR_SET_PDEATHSIG on
    itself and execs the real command (the setting survives exec). No preexec_fn: forking
    a process that runs gRPC threads and then running Python before exec can crash.
    """
    wrapper = [sys.executable, "-m", "fastserve.procs", str(os.getpid()), "--", *args]
    return subprocess.Popen(wrapper, **kwargs)


def _exec_tied_to_parent(parent: int, args: list[str]) -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the line above took effect
        sys.exit(1)
    os.execvp(args[0], args)


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


PORT_POOL = 10_000  # ports just below the kernel's ephemeral range that free_ports draws from
_ports = random.Random()  # its own generator: a test that seeds `random` must not make two processes agree
_handed_out: set[int] = set()


def _listen_pool() -> range | None:
    """Ports below the ephemeral range (none when that range starts too low to leave room)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return range(low - PORT_POOL, low) if low - PORT_POOL >= 1024 else None


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now, none handed out before by this process.

    They come from below the kernel's ephemeral range when it leaves room: a port of that range
    can be taken by any outgoing connection (a gRPC channel, a Redis client) in the seconds between
    this call and the moment a starting service binds it, which failed a CI run; a port outside it
    only by another listener.
    """
    pool = _listen_pool()
    socks: list[socket.socket] = []
    try:
        while len(socks) < n:
            sock = socket.socket()
            socks.append(sock)  # closed below whether or not it binds
            port = _ports.choice(pool) if pool else 0
            try:
                if port in _handed_out:
                    raise OSError("handed out already")
                sock.bind((host, port))
            except OSError:
                socks.pop().close()
                if len(_handed_out) > PORT_POOL // 2:  # a long-lived process: start over
                    _handed_out.clear()
        ports = [sock.getsockname()[1] for sock in socks]
        _handed_out.update(ports)
        return ports
    finally:
        for sock in socks:
            sock.close()


def stop_all(procs: list[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM every child, then SIGKILL what is still alive after `timeout`."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    _exec_tied_to_parent(int(sys.argv[1]), sys.argv[3:])
