"""Redis that refuses writes is Redis away: a full disk under the embedded Redis (a small tmpfs as the
data dir) costs no stream, not even across a scheduler SIGKILL; GetRequest says UNAVAILABLE and why
instead of a stale state; once space returns the records catch up. A data dir that cannot be
written stops `fastserve up` with one line naming it.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import redis

from fastserve.procs import free_port
from fastserve.store import UNFINISHED, request_key
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.internal_rpc import scheduler_info
from tests.reference import PROMPTS, hf_greedy
from tests.test_lease_e2e import start_streams
from tests.test_recovery_e2e import back_up, supervised_stack

FR = common_pb2.FinishReason
TOKENS = 200
ROOT = Path(__file__).resolve().parents[1]


def fill(directory: Path) -> Path:
    """Writes a file until the filesystem has no byte left; returns it (delete it to give space back)."""
    filler = directory / "filler"
    with filler.open("wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
                out.flush()
                os.fsync(out.fileno())
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def wait_until(condition, timeout: float, what: str) -> float:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not within {timeout}s"
        time.sleep(0.1)
    return time.monotonic()


def refuses_writes(client: redis.Redis) -> bool:
    try:
        client.set("fastserve:test-probe", "1", ex=10)
        return False
    except redis.exceptions.ResponseError:
        return True


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs; needs root (skipped otherwise) and is unmounted whatever happens."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.timeout(600)
def test_a_full_disk_under_redis_loses_no_stream_and_records_catch_up(tiny_checkpoint, small_disk):
    for prompt in PROMPTS:
        hf_greedy(tiny_checkpoint, tuple(prompt), TOKENS)
    stack = supervised_stack(tiny_checkpoint, small_disk, "--max-batch-size", "4")
    try:
        client = redis.Redis.from_url(stack.addresses["redis"], decode_responses=True)
        gateway = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        tokens, finals, threads = start_streams(stack, "full")
        filler = fill(small_disk)
        full = wait_until(lambda: refuses_writes(client), 30, "Redis refusing writes")
        with pytest.raises(grpc.RpcError) as refused:
            gateway.GetRequest(gateway_pb2.GetRequestRequest(request_id="full-0"), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "refuses writes" in refused.value.details(), refused.value.details()
        scheduler = stack.child("scheduler").proc
        scheduler.kill()  # during the full-disk period: its successor starts on a Redis refusing writes
        back_up(stack, "scheduler", scheduler.pid)
        wait_until(lambda: scheduler_info(stack).degraded != "", 30, "the scheduler reporting degraded")
        degraded = scheduler_info(stack).degraded
        for t in threads:
            t.join(300)
        for i in range(8):
            assert getattr(finals[i], "finish_reason", None) == FR.FINISH_REASON_LENGTH, (i, finals[i])
            assert tokens[i] == hf_greedy(tiny_checkpoint, tuple(PROMPTS[i]), TOKENS), f"stream {i}"
        assert refuses_writes(client), "the disk was still full while the streams ran"
        filler.unlink()
        freed = time.monotonic()
        ids = [f"full-{i}" for i in range(8)]

        def caught_up() -> bool:
            if refuses_writes(client) or client.sismember(UNFINISHED, ids[0]):
                return False
            states = [client.hmget(request_key(rid), "state", "generated_tokens") for rid in ids]
            return states == [["finished", str(TOKENS)]] * 8 and not client.smembers(UNFINISHED) & set(ids)

        settled = wait_until(caught_up, 60, "the records catching up")
        info = gateway.GetRequest(gateway_pb2.GetRequestRequest(request_id="full-3"), timeout=10)
        assert (info.state, info.generated_tokens) == ("finished", TOKENS)
        # the job log clears its problem once its write has returned: after Redis holds the records
        wait_until(lambda: scheduler_info(stack).degraded == "", 30, "the scheduler no longer degraded")
        print(
            f"\nfull disk: 8/8 streams exact across a scheduler SIGKILL; degraded: {degraded!r}; "
            f"records caught up {settled - freed:.2f}s after space returned "
            f"(Redis refused writes {freed - full:.1f}s)",
            flush=True,
        )
    finally:
        stack.stop()


def test_a_data_dir_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    data_dir = blocker / "data"  # under a regular file: cannot be created, even by root
    done = subprocess.run(
        [sys.executable, "-m", "fastserve.cli", "up", "--data-dir", str(data_dir), "--port", str(free_port())]
        + ["--demo", "false"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    last = output.strip().splitlines()[-1]
    assert "--data-dir" in last and str(data_dir.parent) in last, last
