"""The Engine in-process, with a fake worker group and the KV manager's service object on a fake stream."""

from __future__ import annotations

import asyncio

import pytest

from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.server import KVManagerService
from fastserve.services.scheduler.core import CoreConfig, SchedulerCore
from fastserve.services.scheduler.core.core import GROW_AHEAD
from fastserve.services.scheduler.engine import Engine
from fastserve.services.scheduler.policy import BatchLimits, CostModel, PolicyConfig, make_policy
from fastserve.services.scheduler.workers import WorkerError
from fastserve.v1 import common_pb2, scheduler_pb2, worker_pb2

EOS = 2
FR = common_pb2.FinishReason


class FakePlanCall:
    """One Plan stream: each request answered in order by the real KV manager service object."""

    def __init__(self, service: KVManagerService, log: list) -> None:
        self.service, self.log = service, log
        self.replies: asyncio.Queue = asyncio.Queue()

    def cancel(self) -> None:
        self.replies.put_nowait(None)

    async def write(self, request) -> None:
        self.log.append(request)
        self.replies.put_nowait(self.service._answer(request))

    def __aiter__(self):
        return self

    async def __anext__(self):
        reply = await self.replies.get()
        if reply is None:
            raise StopAsyncIteration
        return reply


class FakeKV:
    def __init__(self, config: CoreConfig) -> None:
        self.service = KVManagerService()
        self.service.blocks = BlockManager(config.num_gpu_blocks, config.block_size, config.host_blocks)
        self.service.swap_policy, self.service.reserve = config.swap_policy, config.reserve
        self.requests: list = []

    def Plan(self, metadata=()) -> FakePlanCall:  # noqa: N802 (the stub's name)
        return FakePlanCall(self.service, self.requests)


class FakeWorkers:
    """Token = 100 + sample index, or EOS where scripted; keeps each job's last token and its block
    table (from the diffs it is sent) like a worker."""

    def __init__(self, eos_at: dict[str, int] | None = None) -> None:
        self.eos_at = eos_at or {}
        self.tables: dict[str, list[int]] = {}
        self.kv_tables: dict[str, list[int]] | None = None  # the KV manager's, to check ours against
        self.requests: list[worker_pb2.StepRequest] = []
        self.gate: asyncio.Event | None = None
        self.last: dict[str, int] = {}
        self.lock = asyncio.Lock()
        self.broken = None  # a WorkerGroup's outage flag

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        self.requests.append(request)
        async with self.lock:  # one step at a time, in order, as a worker rank runs them
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(0)
            tokens = []
            for s in request.seqs:
                table = self.tables[s.request_id] = self.tables.get(s.request_id, [])[
                    : s.table_offset
                ] + list(s.block_table)
                if self.kv_tables is not None:
                    assert table == self.kv_tables[s.request_id], s.request_id
                fed = list(s.token_ids) or [self.last[s.request_id]]
                assert fed, s.request_id
                token = EOS if self.eos_at.get(s.request_id) == s.sample_index else 100 + s.sample_index
                self.last[s.request_id] = token
                tokens.append(token)
            return worker_pb2.StepResponse(step_id=request.step_id, token_ids=tokens, compute_seconds=1e-3)


class FakeStore:
    """The job log's interface: field updates and tokens, per job."""

    def __init__(self) -> None:
        self.records: dict[str, dict] = {}
        self.tokens: dict[str, list[int]] = {}

    def update(self, request_id: str, fields, tokens=None) -> None:
        self.records.setdefault(request_id, {}).update(fields)
        if tokens is not None:
            self.tokens[request_id] = list(tokens)


def make_engine(
    workers: FakeWorkers, policy: str = "fcfs", batch: int = 4, gpu: int = 64, quantum: float = 0.02, **kw
):
    config = CoreConfig(
        num_gpu_blocks=gpu, limits=BatchLimits(batch), block_size=4, eos_token_id=EOS, reserve_blocks=0, **kw
    )
    cost = CostModel(c0=0.01, c_prefill=0.001)
    core = SchedulerCore(
        config, make_policy(PolicyConfig(name=policy, base_quantum=quantum, num_queues=4), cost)
    )
    kv = FakeKV(config)
    return Engine(core, workers, kv, FakeStore(), cost, block_bytes=1), kv  # type: ignore[arg-type]


def request(rid: str, prompt: int = 3, max_tokens: int = 5) -> scheduler_pb2.SubmitRequest:
    sampling = common_pb2.ResolvedSampling(max_tokens=max_tokens, top_p=1.0, repetition_penalty=1.0)
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[1] * prompt, sampling=sampling)


async def drain(live) -> tuple[list[int], int]:
    tokens = []
    while True:
        message = await asyncio.wait_for(live.outbox.get(), 10)
        tokens += list(message.token_ids)
        if message.finish_reason:
            return tokens, message.finish_reason


def run(coro):
    return asyncio.run(coro)


async def with_engine(engine: Engine, body):
    loop = asyncio.create_task(engine.run())
    try:
        return await body()
    finally:
        loop.cancel()
        with pytest.raises(asyncio.CancelledError):
            await loop


@pytest.mark.parametrize("overlap", [False, True])
def test_streams_every_token_and_asks_the_kv_manager_only_for_new_blocks(overlap):
    workers = FakeWorkers()
    engine, kv = make_engine(workers, batch=2, overlap=overlap)

    async def body():
        lives = [engine.submit(request(r, max_tokens=6)) for r in "abc"]
        return [await drain(live) for live in lives]

    results = run(with_engine(engine, body))
    assert results == [([100, 101, 102, 103, 104, 105], FR.FINISH_REASON_LENGTH)] * 3
    plans = [r for r in kv.requests if r.batch]
    assert len(plans) < len(workers.requests) / 2  # most steps went out with no round trip
    assert sorted(r for m in kv.requests for r in m.free) == ["a", "b", "c"]
    assert engine.store.records["a"]["state"] == "finished"
    assert engine.store.records["a"]["generated_tokens"] == 6
    assert engine.store.tokens["a"] == [100, 101, 102, 103, 104, 105]
    if overlap:
        assert any(
            not s.token_ids for r in workers.requests for s in r.seqs
        )  # fed from the worker's own token


def test_a_token_sampled_after_the_last_one_never_reaches_the_client():
    workers = FakeWorkers(eos_at={"a": 2})
    engine, _ = make_engine(workers, overlap=True)
    result = run(with_engine(engine, lambda: drain(engine.submit(request("a", max_tokens=20)))))
    assert result == ([100, 101, EOS], FR.FINISH_REASON_STOP)
    sampled = [s.sample_index for r in workers.requests for s in r.seqs]
    assert 3 in sampled  # the step after EOS was already on its way, and its token was dropped


def test_abort_while_in_flight_ends_the_stream_cancelled():
    workers = FakeWorkers()
    workers.gate = asyncio.Event()
    engine, kv = make_engine(workers)

    async def body():
        live = engine.submit(request("a", max_tokens=50))
        while not workers.requests:
            await asyncio.sleep(0.001)
        assert engine.abort("a") is True
        workers.gate.set()
        return await drain(live)

    tokens, reason = run(with_engine(engine, body))
    assert reason == FR.FINISH_REASON_CANCELLED and len(tokens) <= 2
    assert not engine.jobs and not engine.core.seqs


def test_pipeline_slots_keep_disjoint_batches_in_flight():
    workers = FakeWorkers()
    workers.gate = asyncio.Event()
    engine, _ = make_engine(workers, batch=1, pp_size=2)

    async def body():
        lives = [engine.submit(request(r, max_tokens=3)) for r in "ab"]
        while len(workers.requests) < 2:
            await asyncio.sleep(0.001)
        in_flight = [[s.request_id for s in r.seqs] for r in workers.requests]
        workers.gate.set()
        return in_flight, [await drain(live) for live in lives]

    in_flight, results = run(with_engine(engine, body))
    assert in_flight == [["a"], ["b"]]
    assert results == [([100, 101, 102], FR.FINISH_REASON_LENGTH)] * 2


def test_recomputed_jobs_prefill_their_tokens_again_and_stream_the_same_tokens():
    workers = FakeWorkers()
    # every iteration uses up a quantum: the three jobs take turns and outgrow the six blocks
    engine, kv = make_engine(workers, policy="mlfq", batch=1, gpu=6, quantum=1e-9, swap_policy="recompute")

    async def body():
        lives = [engine.submit(request(r, prompt=8, max_tokens=12)) for r in "abc"]
        return [await drain(live) for live in lives]

    results = run(with_engine(engine, body))
    assert results == [([100 + i for i in range(12)], FR.FINISH_REASON_LENGTH)] * 3
    prefills = [s for r in workers.requests for s in r.seqs if len(s.token_ids) > 1]
    recomputed = [s for s in prefills if s.sample_index > 0]
    assert recomputed, "the tiny pool should have forced a recompute"
    for s in recomputed:  # prompt, then every token generated so far
        assert list(s.token_ids) == [1] * 8 + [100 + i for i in range(s.sample_index)]


def test_a_worker_outage_holds_the_jobs_and_they_recompute_when_the_group_is_back():
    workers = FakeWorkers()
    engine, kv = make_engine(workers, batch=2)
    original = workers.step

    async def step(request):
        if len(workers.requests) == 3 and workers.broken is None:  # the 4th step: a rank dies
            workers.requests.append(request)
            workers.broken = WorkerError("worker rank 0: UNAVAILABLE")
            raise workers.broken
        return await original(request)

    async def recover():
        workers.broken = None
        kv.service.blocks = BlockManager(64, 4, 0)  # configured anew: it knows no tables
        engine.forget_kv()

    workers.step, engine.recover = step, recover
    result = run(with_engine(engine, lambda: drain(engine.submit(request("a", max_tokens=6)))))
    assert result == ([100, 101, 102, 103, 104, 105], FR.FINISH_REASON_LENGTH)
    redo = [s for r in workers.requests[4:] for s in r.seqs if len(s.token_ids) > 1]
    assert [list(s.token_ids) for s in redo] == [[1, 1, 1, 100, 101, 102]]  # prompt + the tokens it had


def test_tables_travel_as_diffs_and_whole_again_after_a_swap():
    workers = FakeWorkers()
    # jobs take turns (a quantum per iteration) in a pool too small for all: they swap out and back in
    engine, kv = make_engine(workers, policy="mlfq", batch=1, gpu=8, quantum=1e-9, num_host_blocks=32)
    workers.kv_tables = kv.service.blocks.tables  # every step's table is the KV manager's own
    answer, tables = kv.service._answer, []

    def recording(request):
        reply = answer(request)
        tables.extend(reply.tables)
        return reply

    kv.service._answer = recording

    async def body():
        lives = [engine.submit(request(r, prompt=5, max_tokens=14)) for r in "abc"]
        return [await drain(live) for live in lives]

    results = run(with_engine(engine, body))
    assert results == [([100 + i for i in range(14)], FR.FINISH_REASON_LENGTH)] * 3
    assert kv.service.counters["out"] > 0 and kv.service.counters["in"] > 0, "the small pool forces swaps"
    grown = [t for t in tables if t.offset]
    # only what it lacked: its next block and the ones ahead of it, or none
    assert grown and all(len(t.blocks) <= 1 + GROW_AHEAD for t in grown)
    whole = [t for t in tables if not t.offset]
    assert len(whole) > 3  # the first time, and again after each swap back in
