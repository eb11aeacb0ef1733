"""No work for departed clients: a job nobody re-attaches to is cancelled, a clean stop cancels what
it served (and writes its job log first), and the next `up` regenerates nothing.

Real processes under `fastserve up`'s supervisor with its embedded Redis (password, AOF); numbers
are printed (`-s` shows them).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import grpc
import pytest
import redis

from fastserve.store import FINAL_STATES, UNFINISHED, request_key
from fastserve.v1 import common_pb2, gateway_pb2_grpc
from tests.internal_rpc import kv_stats, scheduler_info
from tests.reference import PROMPTS, greedy
from tests.test_recovery_e2e import back_up, supervised_stack

FR = common_pb2.FinishReason
TOKENS = 200
ORPHAN_TIMEOUT = 3.0
LEASE_SLACK = 15.0  # seconds past the lease a loaded machine may need; still well below the 30 s default


def start_streams(
    stack, prefix: str
) -> tuple[dict[int, list[int]], dict[int, object], list[threading.Thread]]:
    """8 greedy streams of TOKENS tokens; returns their tokens so far, final replies (or errors), threads."""
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
    tokens: dict[int, list[int]] = {i: [] for i in range(8)}
    finals: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            for reply in stub.Generate(greedy(PROMPTS[i], TOKENS, request_id=f"{prefix}-{i}"), timeout=600):
                tokens[i].extend(reply.token_ids)
                finals[i] = reply
        except grpc.RpcError as exc:
            finals[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(map(len, tokens.values())) < 5:  # every stream under way
        assert time.monotonic() < deadline, "streams did not get going"
        time.sleep(0.01)
    return tokens, finals, threads


def records(stack, ids: list[str]) -> dict[str, dict[str, str]]:
    client = redis.Redis.from_url(stack.addresses["redis"], decode_responses=True)
    return {rid: client.hgetall(request_key(rid)) for rid in ids}


@pytest.mark.timeout(600)
def test_jobs_whose_gateway_died_with_the_scheduler_are_cancelled_within_the_lease(tiny_checkpoint, tmp_path):
    stack = supervised_stack(
        tiny_checkpoint,
        tmp_path,
        *("--max-batch-size", "8", "--orphan-timeout", str(ORPHAN_TIMEOUT), "--job-log-interval", "0"),
    )
    try:
        _, finals, threads = start_streams(stack, "orphan")
        ids = [f"orphan-{i}" for i in range(8)]
        gateway, scheduler = stack.child("gateway").proc, stack.child("scheduler").proc
        gateway.kill()
        scheduler.kill()
        killed = time.monotonic()
        scheduler.wait()
        at_kill = {rid: int(r.get("generated_tokens", 0)) for rid, r in records(stack, ids).items()}
        for t in threads:
            t.join(60)
        assert all(isinstance(finals[i], grpc.RpcError) for i in range(8)), "the clients' gateway died"
        serving = back_up(stack, "scheduler", scheduler.pid)
        deadline = serving + ORPHAN_TIMEOUT + LEASE_SLACK
        while True:
            now = records(stack, ids)
            if all(r.get("state") in FINAL_STATES for r in now.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        settled = time.monotonic()
        assert {rid: r.get("state") for rid, r in now.items()} == dict.fromkeys(ids, "cancelled")
        assert redis.Redis.from_url(stack.addresses["redis"]).smembers(UNFINISHED) == set()
        after = sum(int(r["generated_tokens"]) for r in now.values()) - sum(at_kill.values())
        assert after <= 8, f"{after} tokens generated for nobody after the kill"
        assert kv_stats(stack).num_jobs == 0
        print(
            f"\nkill -> scheduler SERVING {serving - killed:.2f}s, -> all 8 cancelled {settled - killed:.2f}s "
            f"(SERVING + {settled - serving:.2f}s, --orphan-timeout {ORPHAN_TIMEOUT:g}); "
            f"tokens after the kill: {after}",
            flush=True,
        )
    finally:
        stack.stop()


@pytest.mark.timeout(600)
def test_a_clean_stop_cancels_what_it_served_and_the_next_up_regenerates_nothing(tiny_checkpoint, tmp_path):
    flags = ("--max-batch-size", "8", "--orphan-timeout", str(ORPHAN_TIMEOUT))
    stack = supervised_stack(tiny_checkpoint, tmp_path, *flags)
    port = stack.args.port
    try:
        tokens, finals, threads = start_streams(stack, "stopped")
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        last = list(stub.Generate(greedy(PROMPTS[2], 3, request_id="just-before"), timeout=120))[-1]
        assert last.finish_reason == FR.FINISH_REASON_LENGTH
    finally:
        stack.stop()  # what SIGTERM / Ctrl-C of `fastserve up` runs, at once after the last message
    for t in threads:
        t.join(60)
    told = [i for i in range(8) if getattr(finals[i], "finish_reason", None) == FR.FINISH_REASON_CANCELLED]
    ids = [f"stopped-{i}" for i in range(8)]
    again = supervised_stack(tiny_checkpoint, tmp_path, *flags, "--port", str(port))
    try:
        before = records(again, [*ids, "just-before"])
        assert before["just-before"]["state"] == "finished"
        assert {rid: before[rid]["state"] for rid in ids} == dict.fromkeys(ids, "cancelled")
        info = scheduler_info(again)
        time.sleep(ORPHAN_TIMEOUT + 1)  # what a lease would take: still nothing runs
        later = records(again, ids)
        assert {rid: later[rid]["generated_tokens"] for rid in ids} == {
            rid: before[rid]["generated_tokens"] for rid in ids
        }
        assert kv_stats(again).num_jobs == 0 and info.num_waiting == 0
        print(
            f"\nstop: {len(told)}/8 clients told 'cancelled'; streamed {sum(map(len, tokens.values()))} tokens; "
            f"after `up` again: waiting {info.num_waiting}, records unchanged",
            flush=True,
        )
    finally:
        again.stop()


@pytest.mark.timeout(600)
def test_a_client_that_gives_up_during_a_scheduler_outage_leaves_no_work(tiny_checkpoint, tmp_path):
    stack = supervised_stack(
        tiny_checkpoint, tmp_path, *("--max-batch-size", "8", "--orphan-timeout", str(ORPHAN_TIMEOUT))
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        call = stub.Generate(greedy(PROMPTS[0], TOKENS, request_id="gave-up"), timeout=600)
        received = [t for _ in range(3) for t in next(call).token_ids]
        scheduler = stack.child("scheduler").proc
        os.kill(scheduler.pid, signal.SIGSTOP)  # an outage: the scheduler answers nothing
        call.cancel()  # the client gives up (its deadline) while the scheduler is away
        scheduler.kill()
        scheduler.wait()
        at_kill = int(records(stack, ["gave-up"])["gave-up"].get("generated_tokens", 0))
        serving = back_up(stack, "scheduler", scheduler.pid)
        deadline = serving + ORPHAN_TIMEOUT + LEASE_SLACK
        while records(stack, ["gave-up"])["gave-up"].get("state") not in FINAL_STATES:
            assert time.monotonic() < deadline, "the abandoned job was not cancelled"
            time.sleep(0.1)
        record = records(stack, ["gave-up"])["gave-up"]
        assert record["state"] == "cancelled"
        assert int(record["generated_tokens"]) == at_kill  # nothing generated after the kill
        assert kv_stats(stack).num_jobs == 0 and scheduler_info(stack).num_waiting == 0
        print(
            f"\nclient gave up during the outage after {len(received)} tokens: cancelled "
            f"{time.monotonic() - serving:.2f}s after the new scheduler served; 0 tokens generated for nobody",
            flush=True,
        )
    finally:
        stack.stop()


@pytest.mark.timeout(600)
def test_keep_work_on_stop_leaves_the_jobs_to_the_next_scheduler_under_the_lease(tiny_checkpoint, tmp_path):
    flags = ("--max-batch-size", "8", "--orphan-timeout", str(ORPHAN_TIMEOUT), "--keep-work-on-stop")
    stack = supervised_stack(tiny_checkpoint, tmp_path, *flags)
    port = stack.args.port
    try:
        _, _, threads = start_streams(stack, "kept")
    finally:
        stack.stop()
    for t in threads:
        t.join(60)
    # its streams were ended, UNAVAILABLE, before the server stopped: none was cancelled under it
    said = "\n".join(stack.output.tails["scheduler"])
    assert "stopping: leaving to the next scheduler" in said, said
    assert "Traceback" not in said and "CancelledError" not in said, said
    ids = [f"kept-{i}" for i in range(8)]
    # the next `up` with a lease long enough to look: the kept jobs wait, parked, for their gateways
    again = supervised_stack(
        tiny_checkpoint, tmp_path, *flags, "--port", str(port), "--orphan-timeout", "600"
    )
    try:
        left = records(again, ids)
        assert all(r["state"] not in FINAL_STATES for r in left.values()), left
        assert scheduler_info(again).num_waiting == 8 and kv_stats(again).num_jobs == 0
        time.sleep(1)
        assert records(again, ids) == left  # parked: nothing runs for nobody
    finally:
        again.stop()
    print("\n--keep-work-on-stop: 8 jobs left unfinished, parked by the next scheduler", flush=True)
