"""The scheduler's durable job log against a real redis-server (appends, final states, lost writes),
and the supervisor's restart budget on real processes."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
import redis

from fastserve.store import UNFINISHED, JobLog, RequestStore, StoreUnavailable, request_key, tokens_key


async def settle(log: JobLog) -> None:
    assert await log.flushed(timeout=10)


def test_job_log_appends_tokens_finishes_and_rewrites_what_redis_lost(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.delete(UNFINISHED)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        log = JobLog(store)
        log.start()
        tokens: list[int] = []
        log.begin("a", b"spec-a", {"state": "queued", "prompt_tokens": 3})
        log.update("a", {"state": "running"}, tokens)
        for step in range(5):
            tokens.append(100 + step)
            log.update("a", {"generated_tokens": len(tokens)}, tokens)
            await settle(log)
        saved = await store.unfinished()
        assert [(j.request_id, j.spec, j.tokens) for j in saved] == [
            ("a", b"spec-a", [100, 101, 102, 103, 104])
        ]

        client.flushall()  # Redis restarted and lost everything (an AOF loses at most its last second)
        tokens.append(105)
        log.update("a", {"generated_tokens": len(tokens)}, tokens)
        await settle(log)
        await asyncio.sleep(0.2)  # the counter mismatch triggers a full rewrite
        await settle(log)
        saved = await store.unfinished()
        assert [(j.request_id, j.tokens) for j in saved] == [("a", [100, 101, 102, 103, 104, 105])]
        assert saved[0].fields["state"] == "running" and saved[0].fields["prompt_tokens"] == 3

        log.update("a", {"state": "finished", "finish_reason": "length"}, tokens)
        await settle(log)
        assert await store.unfinished() == []
        assert (await store.read("a"))["state"] == "finished"
        await log.stop()
        await store.close()

    asyncio.run(scenario())
    assert client.ttl(request_key("a")) > 0 and client.ttl(tokens_key("a")) > 0


def test_a_flush_writes_only_the_jobs_and_fields_that_changed(redis_url):
    """1 000 tracked jobs, one token for one of them: the flush touches that job's changed field only."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        log = JobLog(store)
        log.start()
        tokens = {f"j{i}": [] for i in range(1000)}
        for rid in tokens:
            log.begin(rid, b"spec", {"state": "running", "generated_tokens": 0, "queue_level": 1})
        await settle(log)
        client.hdel(request_key("j7"), "queue_level")  # untouched fields are not written again ...
        client.delete(request_key("j8"))  # ... nor are untouched jobs
        tokens["j7"].append(42)
        log.update("j7", {"state": "running", "generated_tokens": 1, "queue_level": 1}, tokens["j7"])
        await settle(log)
        assert client.hgetall(request_key("j7")) == {
            "state": "running",
            "generated_tokens": "1",
            "spec": "c3BlYw==",
        }
        assert not client.exists(request_key("j8"))
        # the session's Redis may hold other stacks' unfinished jobs too
        assert {job.request_id for job in await store.unfinished()} >= set(tokens) - {"j8"}
        await log.stop()
        await store.close()
        client.srem(UNFINISHED, *tokens)  # the session's Redis serves stacks that restore unfinished jobs

    asyncio.run(scenario())


def test_job_log_keeps_serving_while_redis_is_away_and_read_says_unavailable():
    # a port bound but not listening refuses connections, and no other process can take it meanwhile
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))

    async def scenario() -> None:
        store = RequestStore(f"redis://127.0.0.1:{closed.getsockname()[1]}/0", ttl_seconds=60)
        log = JobLog(store, retry_seconds=0.05)
        log.start()
        log.begin("b", b"spec", {"state": "queued"})  # returns at once: nothing waits for Redis
        for _ in range(200):  # its first write fails (when depends on the machine's load)
            if not log.healthy:
                break
            await asyncio.sleep(0.05)
        assert not log.healthy and log.tracked["b"].dirty and "takes no writes" in log.problem
        with pytest.raises(StoreUnavailable, match="unreachable"):
            await store.read("b")
        await log.stop()

    try:
        asyncio.run(scenario())
    finally:
        closed.close()


def test_supervisor_restarts_with_backoff_and_gives_up_naming_the_exit_status():
    from fastserve.launcher import Stack, parse_args
    from fastserve.procs import popen_child

    stack = Stack(parse_args(["--max-restarts-per-minute", "2", "--redis-url", "redis://unused"]))
    starts: list[float] = []

    def start():
        starts.append(time.monotonic())
        return popen_child(["sh", "-c", "exit 3"])

    stack.add("flaky", start)
    with pytest.raises(RuntimeError, match="flaky died 3 times within a minute"):
        stack.supervise()
    stack.stop()
    assert len(starts) == 3  # the first start and two restarts
    assert starts[2] - starts[1] >= 0.25  # the second restart waited (backoff)
