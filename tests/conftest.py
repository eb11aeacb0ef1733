"""Fixtures shared by the end-to-end tests: real Redis, real processes, real gRPC."""

from __future__ import annotations

import subprocess

import pytest

from fastserve.embedded_redis import start_redis
from fastserve.launcher import Stack, parse_args
from fastserve.procs import free_port


@pytest.fixture(scope="session")
def redis_url():
    proc, url = start_redis()
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    from tests.helpers_checkpoint import make_tiny_opt_checkpoint

    return str(make_tiny_opt_checkpoint(tmp_path_factory.mktemp("tiny-opt"), layers=4, heads=4, hidden=64))


def start_stack(redis_url: str, *flags: str) -> Stack:
    """The whole stack as separate processes on free ports (what `fastserve up` runs)."""
    args = parse_args(
        [
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--http-port",
            str(free_port()),
            "--redis-url",
            redis_url,
            "--demo",
            "false",
            "--log-level",
            "WARNING",
            "--start-timeout",
            "180",
            *flags,
        ]
    )
    stack = Stack(args)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture(scope="session")
def checkpoint_stack(redis_url, tiny_checkpoint):
    """A stack serving the tiny Hugging Face checkpoint with FCFS, shared by several tests; with
    async scheduling, which CPU workers leave off by default, so the live overlap path is served too."""
    stack = start_stack(
        redis_url,
        *("--model", tiny_checkpoint, "--num-gpu-blocks", "256", "--served-model-name", "tiny-opt"),
        *("--async-scheduling", "true"),
    )
    yield stack
    stack.stop()


def alive(pid: int) -> bool:
    try:
        state = subprocess.run(
            ["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return False
    return bool(state) and not state.startswith("Z")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in a tests/test_*_e2e.py file is an end-to-end test: `-m "not e2e"` is the fast tier."""
    for item in items:
        if item.path.name.endswith("_e2e.py"):
            item.add_marker(pytest.mark.e2e)
