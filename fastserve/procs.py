"""Child processes that never outlive their parent."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys

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


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct ports free right now (all held open together, so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
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
