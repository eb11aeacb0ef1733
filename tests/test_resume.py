"""A scheduler restart: jobs restored from a real Redis wait for their gateway (a lease), then go back
where they were queued; a job nobody comes back for is cancelled, its record says so."""

from __future__ import annotations

import asyncio

import redis

from fastserve.services.scheduler import resume
from fastserve.services.scheduler.lease import Leases
from fastserve.store import UNFINISHED, JobLog, RequestStore
from tests.test_engine import FakeWorkers, make_engine, request


def test_restored_jobs_keep_their_queue_level_account_and_counters(redis_url):
    redis.Redis.from_url(redis_url).delete(UNFINISHED)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        before = JobLog(store)  # the scheduler that died: its last flush
        before.start()
        spec = request("restored-deep", prompt=3, max_tokens=8)  # skip-join would put it in Q0
        before.begin(
            "restored-deep",
            spec.SerializeToString(),
            {
                "state": "preempted",
                "queue_level": 2,
                "queue_account": 0.031,
                "preemptions": 4,
                "demotions": 2,
                "promotions": 1,
                "swaps_out": 3,
            },
        )
        before.update("restored-deep", {}, [100, 101])
        assert await before.flushed(timeout=10)
        await before.stop()

        engine, _ = make_engine(FakeWorkers(), policy="skip-join-mlfq")
        after = JobLog(store)
        after.start()
        leases = Leases(after, orphan_timeout=60)
        assert await resume.restore(engine, after, store, leases) == 1
        assert engine.core.seqs == {}  # parked: nothing runs until its gateway re-attaches
        resumed = request("restored-deep", prompt=3, max_tokens=8)
        resumed.resume = True
        resumed.generated_token_ids.append(100)  # the client had one token; Redis holds two
        live, opening = resume.claim(engine, after, leases.claim("restored-deep"), resumed, [100])
        assert (opening.first_index, list(opening.token_ids)) == (1, [101])
        assert live.seq.generated == [100, 101]
        job = engine.core.seqs["restored-deep"].job
        assert (job.level, job.quantum_used) == (2, 0.031)
        assert (job.preemptions, job.demotions, job.promotions) == (4, 2, 1)
        assert await after.flushed(timeout=10)
        record = await store.read("restored-deep")
        assert (record["queue_level"], record["queue_account"], record["preemptions"]) == (2, 0.031, 4)
        assert (record["swaps_out"], record["recomputes"]) == (3, 1)
        await after.stop()
        await store.close()

    asyncio.run(scenario())
    redis.Redis.from_url(redis_url).delete(UNFINISHED)  # the session's Redis also serves whole stacks


def test_a_saved_job_that_does_not_parse_is_marked_failed_and_the_rest_are_restored(redis_url):
    redis.Redis.from_url(redis_url).delete(UNFINISHED)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        before = JobLog(store)
        before.start()
        before.begin("garbled", b"\xff\xff not a SubmitRequest", {"state": "running"})
        before.begin("fine", request("fine", prompt=3, max_tokens=4).SerializeToString(), {"state": "queued"})
        assert await before.flushed(timeout=10)
        await before.stop()

        engine, _ = make_engine(FakeWorkers())
        after = JobLog(store)
        after.start()
        leases = Leases(after, orphan_timeout=60)
        assert await resume.restore(engine, after, store, leases) == 1
        assert list(leases.parked) == ["fine"]
        assert await after.flushed(timeout=10)
        assert (await store.read("garbled"))["state"] == "failed"
        assert [job.request_id for job in await store.unfinished()] == ["fine"]
        await after.stop()
        await store.close()

    asyncio.run(scenario())
    redis.Redis.from_url(redis_url).delete(UNFINISHED)


def test_a_restored_job_keeps_the_length_predicted_when_it_was_first_taken_on(redis_url):
    redis.Redis.from_url(redis_url).delete(UNFINISHED)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        first, _ = make_engine(FakeWorkers(), policy="predicted-srpt")
        first.predictor = lambda ids: 777
        before = JobLog(store)
        before.start()
        resume.take_on(first, before, request("predicted", prompt=3, max_tokens=8), [])
        assert first.core.seqs["predicted"].job.predicted_len == 777
        assert await before.flushed(timeout=10)
        await before.stop()
        assert (await store.read("predicted"))["predicted_len"] == 777

        engine, _ = make_engine(FakeWorkers(), policy="predicted-srpt")
        engine.predictor = lambda ids: 5  # a new model after the restart does not re-predict old jobs
        after = JobLog(store)
        after.start()
        leases = Leases(after, orphan_timeout=60)
        assert await resume.restore(engine, after, store, leases) == 1
        resumed = request("predicted", prompt=3, max_tokens=8)
        resumed.resume = True
        resume.claim(engine, after, leases.claim("predicted"), resumed, [])
        assert engine.core.seqs["predicted"].job.predicted_len == 777
        resume.take_on(engine, after, request("new", prompt=3, max_tokens=8), [])
        assert engine.core.seqs["new"].job.predicted_len == 5
        engine.abort("new")
        engine.abort("predicted")
        assert await after.flushed(timeout=10)
        await after.stop()
        await store.close()

    asyncio.run(scenario())
    redis.Redis.from_url(redis_url).delete(UNFINISHED)


def test_a_restored_job_nobody_reattaches_to_is_cancelled_when_its_lease_runs_out(redis_url):
    redis.Redis.from_url(redis_url).delete(UNFINISHED)

    async def scenario() -> None:
        store = RequestStore(redis_url, ttl_seconds=60)
        before = JobLog(store)
        before.start()
        before.begin(
            "orphan", request("orphan", prompt=3, max_tokens=8).SerializeToString(), {"state": "running"}
        )
        before.update("orphan", {"generated_tokens": 2}, [7, 8])
        assert await before.flushed(timeout=10)
        await before.stop()

        engine, _ = make_engine(FakeWorkers())
        after = JobLog(store)
        after.start()
        leases = Leases(after, orphan_timeout=30)
        assert await resume.restore(engine, after, store, leases) == 1
        parked_at = leases.parked["orphan"].since
        assert (
            leases.expire(now=parked_at + 29.9) == 0
        )  # a fresh lease: the old scheduler's time does not count
        assert leases.expire(now=parked_at + 30) == 1
        assert leases.parked == {} and engine.core.seqs == {}
        assert await after.flushed(timeout=10)
        record = await store.read("orphan")
        assert (record["state"], record["finish_reason"], record["generated_tokens"]) == (
            "cancelled",
            "cancelled",
            2,
        )
        assert await store.unfinished() == []
        await after.stop()
        await store.close()

    asyncio.run(scenario())
    redis.Redis.from_url(redis_url).delete(UNFINISHED)
