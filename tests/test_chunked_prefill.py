"""Chunked prefill: the batch limits that cut a prefill, the core that runs it in chunks, the worker
that samples nothing for a chunk and gives the same tokens as an unchunked prefill."""

from __future__ import annotations

import pytest
import torch

from fastserve.model_spec import resolve_model
from fastserve.services.scheduler.core import CoreConfig, SchedulerCore
from fastserve.services.scheduler.engine import chunkable
from fastserve.services.scheduler.policy import (
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    chunk_tokens,
    form_batch,
    make_policy,
)
from fastserve.services.scheduler.policy.base import MIN_CHUNK
from fastserve.services.worker.runner import ModelRunner, SeqWork
from fastserve.services.worker.sampling import SamplingParams
from fastserve.v1 import common_pb2
from tests.helpers_checkpoint import make_tiny_opt_checkpoint
from tests.test_core import KV, kinds, step

CHUNKED = BatchLimits(16, 40, chunked_prefill=True)


def job(rid: str, prompt: int, decoding: bool = False, **kw) -> Job:
    return Job(rid, prompt, 100, 0.0, num_generated=1 if decoding else 0, needs_prefill=not decoding, **kw)


# --- form_batch and chunk_tokens (pure) -------------------------------------------------------------


def test_a_prefill_over_the_budget_is_cut_to_the_tokens_left_once_the_jobs_that_fit_are_in():
    jobs = [job("d1", 10, decoding=True), job("p", 100), job("d2", 10, True), job("q", 40), job("r", 9)]
    batch = form_batch(jobs, CHUNKED)
    # p comes first but does not fit whole: d2 (a lower queue's decode) and r fit and run, q (not
    # fitting either) waits, and p takes the rest
    assert [j.request_id for j in batch] == ["d1", "d2", "r", "p"]
    assert chunk_tokens(batch, CHUNKED) == [1, 1, 9, 29]
    unchunked = BatchLimits(16, 40)
    batch = form_batch(jobs, unchunked)
    assert [j.request_id for j in batch] == ["d1", "d2", "r"] and chunk_tokens(batch, unchunked) == [1, 1, 9]


def test_a_partly_prefilled_job_needs_only_the_rest_and_fits_whole():
    rest = job("p", 100, prefilled=70)
    assert rest.tokens_this_iteration == 30
    batch = form_batch([rest, job("d", 10, decoding=True)], CHUNKED)
    assert chunk_tokens(batch, CHUNKED) == [30, 1]


def test_no_chunk_below_the_minimum_and_none_of_a_job_that_must_prefill_whole():
    leaves = BatchLimits(16, MIN_CHUNK + 4, chunked_prefill=True)
    first = job("a", 6)  # leaves MIN_CHUNK - 2 tokens: too few to cut a chunk from b
    assert [j.request_id for j in form_batch([first, job("b", 100), job("c", 3)], leaves)] == ["a", "c"]
    whole = job("w", 45, chunkable=False)
    assert [j.request_id for j in form_batch([job("d", 5, True), whole], CHUNKED)] == ["d"]


def test_with_chunking_a_prefill_over_the_whole_budget_that_may_not_be_cut_runs_first_in_a_batch():
    whole = job("w", 100, chunkable=False)
    batch = form_batch([whole, job("d", 5, True)], CHUNKED)
    assert [j.request_id for j in batch] == ["w"] and chunk_tokens(batch, CHUNKED) == [100]
    assert [j.request_id for j in form_batch([job("d", 5, True), whole], CHUNKED)] == ["d"]


def test_which_jobs_may_be_chunked():
    plain = common_pb2.ResolvedSampling(repetition_penalty=1.0, temperature=0.7)
    assert chunkable(plain)
    for field, value in (("prompt_logprobs", True), ("presence_penalty", 0.5), ("repetition_penalty", 1.2)):
        s = common_pb2.ResolvedSampling()
        s.CopyFrom(plain)
        setattr(s, field, value)
        assert not chunkable(s), field
    s = common_pb2.ResolvedSampling(repetition_penalty=1.0)
    s.structured_outputs.json = "{}"
    assert not chunkable(s)


# --- the core ------------------------------------------------------------------------------------


def make_core(policy: str = "fcfs", tokens: int = MIN_CHUNK + 4, **kw) -> SchedulerCore:
    cost = CostModel(c0=0.01, c_prefill=0.001)
    knobs = PolicyConfig(name=policy, base_quantum=0.02, num_queues=4)
    config = CoreConfig(
        num_gpu_blocks=kw.pop("gpu", 64),
        num_host_blocks=kw.pop("host", 0),
        limits=BatchLimits(4, tokens, chunked_prefill=True),
        block_size=4,
        eos_token_id=2,
        reserve_blocks=0,
        **kw,
    )
    return SchedulerCore(config, make_policy(knobs, cost))


def test_a_long_prompt_prefills_in_chunks_beside_a_decode_and_only_its_last_chunk_samples():
    core = make_core()
    kv = KV(core)
    core.add("d", [5], max_tokens=10, now=0.0)
    core.complete(step(core, kv, 0.0), [7], 0.01, 0.0)
    prompt = list(range(10, 55))  # 45 tokens: chunks of 19, 19 and the last 7 beside d's decode
    core.add("p", prompt, max_tokens=3, now=0.0)
    core.take_events()
    fed = []
    for i in range(3):
        s = step(core, kv, 1.0 + i)
        d, p = s.inputs
        assert d.seq.request_id == "d" and not d.prefill
        assert p.prefill and p.start_pos == len(fed) and p.partial == (i < 2) and p.sample_index == 0
        fed += p.token_ids
        assert s.prefill_tokens == len(p.token_ids) and s.tokens_fed <= MIN_CHUNK + 4
        core.complete(s, [8, 99], 0.01, 1.0 + i)
        tokens = [(e.seq.request_id, e.value) for e in core.take_events() if e.kind == "token"]
        assert tokens == ([("d", 8)] if i < 2 else [("d", 8), ("p", 99)])  # a chunk's token is dropped
    assert fed == prompt
    s = step(core, kv, 4.0)
    p = next(x for x in s.inputs if x.seq.request_id == "p")
    assert (p.token_ids, p.start_pos, p.sample_index, p.prefill) == ([99], 45, 1, False)


def test_overlap_sends_the_next_chunk_while_the_last_is_in_flight():
    core = make_core(overlap=True)
    kv = KV(core)
    core.add("p", list(range(10, 50)), max_tokens=2, now=0.0)  # 40 tokens: 20 + 20
    one, two = step(core, kv, 0.0), step(core, kv, 0.0)
    assert (one.inputs[0].start_pos, one.inputs[0].partial) == (0, True)
    assert (two.inputs[0].start_pos, two.inputs[0].partial) == (20, False)
    assert step(core, kv, 0.0) is None  # at most one step ahead
    core.complete(one, [0], 0.01, 0.0)
    three = step(core, kv, 0.0)  # the decode after the last chunk, fed the token the worker keeps
    assert three.inputs[0].token_ids == [] and three.inputs[0].start_pos == 40
    for s, token in ((two, 7), (three, 8)):
        core.complete(s, [token], 0.01, 0.0)
    assert [e.value for e in core.take_events() if e.kind == "token"] == [7, 8]


def test_a_partly_prefilled_job_whose_kv_is_dropped_starts_its_prefill_again():
    core = make_core()
    kv = KV(core)
    core.add("p", list(range(10, 50)), max_tokens=2, now=0.0)
    core.complete(step(core, kv, 0.0), [0], 0.01, 0.0)
    assert core.seqs["p"].job.prefilled == 20
    core.forget_kv(64, 0)
    assert core.seqs["p"].job.prefilled == 0 and core.seqs["p"].job.needs_prefill
    again = step(core, KV(core), 1.0)
    assert again.inputs[0].start_pos == 0 and again.inputs[0].token_ids == list(range(10, 30))


def test_a_partly_prefilled_job_swapped_out_continues_where_its_chunks_ended():
    core = make_core("skip-join-mlfq", gpu=16, host=16, swap_policy="reactive")
    kv = KV(core)
    core.add("p", list(range(10, 70)), max_tokens=2, now=0.0)  # 60 tokens: 15 blocks, chunks of 20
    first = step(core, kv, 0.0)
    assert first.inputs[0].partial
    core.complete(first, [0], 0.01, 0.0)
    assert core.seqs["p"].job.prefilled == 20
    core.take_events()
    core.add("s", [1] * 19, max_tokens=1, now=1.0)  # a higher queue; its 5 blocks are p's
    s = step(core, kv, 1.0)
    assert [x.seq.request_id for x in s.inputs] == ["s"]
    assert ("swapped_out", "p") in kinds(core) and core.seqs["p"].on_host
    core.complete(s, [3], 0.01, 1.0)
    (item,) = step(core, kv, 2.0).inputs
    assert item.seq.request_id == "p" and not core.seqs["p"].on_host
    assert (item.start_pos, item.token_ids, item.partial) == (20, list(range(30, 50)), True)


def test_skip_join_uses_the_whole_prompt_and_every_chunk_counts_against_the_quantum():
    core = make_core("skip-join-mlfq", tokens=MIN_CHUNK + 4)
    kv = KV(core)
    core.add("p", list(range(10, 70)), max_tokens=2, now=0.0)  # 60 tokens: 3 chunks
    level = core.seqs["p"].job.level
    assert level == core.policy.join_level(core.seqs["p"].job) and level > 0  # predicted from 60 tokens
    core.complete(step(core, kv, 0.0), [0], 0.005, 0.0)
    assert core.seqs["p"].job.quantum_used == pytest.approx(0.005)


# --- the worker ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> ModelRunner:
    path = make_tiny_opt_checkpoint(tmp_path_factory.mktemp("tiny"), layers=2, heads=4, hidden=64)
    return ModelRunner(resolve_model(str(path)), dtype=torch.float32, device="cpu", num_gpu_blocks=64)


def test_chunked_prefill_samples_the_same_tokens_and_logprobs_as_a_whole_one(runner):
    prompt = [2, *range(10, 60)]
    scored = SamplingParams(logprobs=3)
    whole = runner.run([SeqWork("whole", prompt, 0, list(range(0, 8)), scored)])
    table = list(range(8, 16))
    partial = runner.run([SeqWork("c", prompt[:20], 0, table, scored, partial=True)])
    assert partial.tokens == [0] and not partial.logprobs
    assert "c" not in runner.last_tokens
    # the last chunk beside another job's prefill, in one step
    last = runner.run([SeqWork("other", [2, 7, 8], 0, [16]), SeqWork("c", prompt[20:], 20, table, scored)])
    assert last.tokens[1] == whole.tokens[0]
    a, b = whole.logprobs[0], last.logprobs[1]
    assert a.logprob == pytest.approx(b.logprob, abs=1e-5) and [t for t, _ in a.top] == [t for t, _ in b.top]
    tokens = {"whole": [whole.tokens[0]], "c": [last.tokens[1]]}
    for _ in range(5):  # decodes agree too: the chunks wrote the same KV
        pos = len(prompt) + len(tokens["c"]) - 1
        out = runner.run(
            [
                SeqWork("whole", [tokens["whole"][-1]], pos, list(range(0, 8)), sample_index=1),
                SeqWork("c", [tokens["c"][-1]], pos, table, sample_index=1),
            ]
        )
        tokens["whole"].append(out.tokens[0])
        tokens["c"].append(out.tokens[1])
    assert tokens["whole"] == tokens["c"]
