"""SIGKILL one service while 8 greedy streams of 200 tokens run (batch 4, so some are preempted):
every stream finishes, token for token equal to transformers, and the stack serves afterwards.

Real processes under `fastserve up`'s supervisor, with its embedded Redis (password, AOF).
Each recovery time (kill -> first token after the replacement is up) is printed (`-s` shows it).
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import redis

from fastserve.launcher import Stack, parse_args
from fastserve.procs import free_port
from fastserve.rpc import check_serving_sync
from fastserve.store import FINAL_STATES, UNFINISHED, request_key
from fastserve.v1 import common_pb2, gateway_pb2_grpc
from tests.records import SETTLE_SECONDS
from tests.reference import PROMPTS, greedy, hf_greedy

FR = common_pb2.FinishReason
TOKENS = 200


def supervised_stack(tiny_checkpoint: str, data_dir, *flags: str) -> Stack:
    args = parse_args(
        [
            *("--host", "127.0.0.1", "--port", str(free_port()), "--redis-url", ""),
            *("--data-dir", str(data_dir), "--demo", "false", "--log-level", "WARNING"),
            *("--model", tiny_checkpoint, "--num-gpu-blocks", "96", "--max-batch-size", "4"),
            *("--num-threads", "1", "--start-timeout", "180", "--http-port", "0"),
            *flags,
        ]
    )
    stack = Stack(args)
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    stack.supervise_in_background()
    return stack


def back_up(stack: Stack, target: str, old_pid: int, timeout: float = 180) -> float:
    """Waits until `target` runs again in a new process and answers; returns when it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = stack.child(target).proc
        if proc is not None and proc.pid != old_pid and proc.poll() is None:
            if target == "redis":
                try:
                    redis.Redis.from_url(stack.addresses["redis"]).ping()
                    return time.monotonic()
                except redis.exceptions.RedisError:
                    pass
            elif check_serving_sync(stack.addresses[target]):
                return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"{target} did not come back within {timeout}s")


def kill_mid_generation(stack: Stack, target: str, tiny_checkpoint: str) -> float:
    """The acceptance round for one target; returns the recovery time in seconds."""
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
    tokens: dict[int, list[int]] = {i: [] for i in range(8)}
    finals: dict[int, object] = {}
    arrivals: list[float] = []

    def run(i: int) -> None:
        try:
            request = greedy(PROMPTS[i], TOKENS, request_id=f"{target}-{i}")
            for reply in stub.Generate(request, timeout=600):
                tokens[i].extend(reply.token_ids)
                arrivals.append(time.monotonic())
                finals[i] = reply
        except grpc.RpcError as exc:
            finals[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while sum(map(len, tokens.values())) < 8 * TOKENS // 10:  # about a tenth of the way
        assert time.monotonic() < deadline, "streams did not get going"
        time.sleep(0.01)
    victim = stack.child(target).proc
    killed = time.monotonic()
    victim.kill()
    returned = back_up(stack, target, victim.pid)
    for t in threads:
        t.join(600)
    after = [t for t in arrivals if t > returned]
    recovery = (min(after) if after else returned) - killed
    for i in range(8):
        assert not isinstance(finals[i], grpc.RpcError), f"{target}: stream {i} failed: {finals[i]}"
        assert finals[i].finish_reason == FR.FINISH_REASON_LENGTH, (target, i, finals[i])
        assert tokens[i] == hf_greedy(tiny_checkpoint, tuple(PROMPTS[i]), TOKENS), f"{target}: stream {i}"
    served = [t for reply in stub.Generate(greedy([2, 42, 43], 5), timeout=120) for t in reply.token_ids]
    assert len(served) == 5
    print(f"\nSIGKILL {target}: all 8 streams exact; recovered in {recovery:.2f}s", flush=True)
    return recovery


def assert_records_final(stack: Stack, targets: list[str]) -> None:
    client = redis.Redis.from_url(stack.addresses["redis"], decode_responses=True)
    ids = [f"{t}-{i}" for t in targets for i in range(8)]
    deadline = time.monotonic() + SETTLE_SECONDS
    while True:
        states = {rid: client.hget(request_key(rid), "state") for rid in ids}
        unfinished = client.smembers(UNFINISHED) & set(ids)
        if all(s in FINAL_STATES for s in states.values()) and not unfinished or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert {rid: s for rid, s in states.items() if s != "finished"} == {}
    assert unfinished == set()
    for rid in ids:
        assert client.hget(request_key(rid), "generated_tokens") == str(TOKENS)


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    for prompt in PROMPTS:
        hf_greedy(tiny_checkpoint, tuple(prompt), TOKENS)


@pytest.fixture(scope="module")
def tp2_stack(tiny_checkpoint, references, tmp_path_factory):
    stack = supervised_stack(tiny_checkpoint, tmp_path_factory.mktemp("tp2-data"), "--tp", "2")
    yield stack
    stack.stop()


RECOVERY: dict[str, float] = {}
TP2_TARGETS = ["scheduler", "worker1", "kvmanager", "redis"]


@pytest.mark.timeout(600)
def test_tp1_worker_kill_loses_nothing(tiny_checkpoint, references, tmp_path):
    stack = supervised_stack(tiny_checkpoint, tmp_path)
    try:
        RECOVERY["worker0 (tp=1)"] = kill_mid_generation(stack, "worker0", tiny_checkpoint)
        assert_records_final(stack, ["worker0"])
    finally:
        stack.stop()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("target", TP2_TARGETS)
def test_tp2_kill_loses_nothing(tp2_stack, tiny_checkpoint, target):
    RECOVERY[f"{target} (tp=2)"] = kill_mid_generation(tp2_stack, target, tiny_checkpoint)


def test_tp2_records_final_after_every_kill(tp2_stack):
    assert_records_final(tp2_stack, [t for t in TP2_TARGETS if f"{t} (tp=2)" in RECOVERY])
    print("\nrecovery seconds:", {k: round(v, 2) for k, v in RECOVERY.items()}, flush=True)
