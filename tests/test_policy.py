"""The scheduling rules, pinned: skip-join placement, demotion, starvation promotion, batch limits, SRPT."""

from __future__ import annotations

import pytest

from fastserve.services.scheduler.core.enst import EnstEstimator
from fastserve.services.scheduler.policy import (
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
)


def job(rid: str, prompt: int = 10, max_tokens: int = 100, arrival: float = 0.0, **kw) -> Job:
    return Job(rid, prompt, max_tokens, arrival, **kw)


def mlfq(name: str = "skip-join-mlfq", **knobs) -> object:
    # prefill time = 0.01 + 0.001 * tokens; quanta 0.02, 0.04, 0.08, 0.16
    cost = CostModel(c0=0.01, c_prefill=0.001)
    config = PolicyConfig(name=name, base_quantum=0.02, quantum_ratio=2, num_queues=4, **knobs)
    return make_policy(config, cost)


@pytest.mark.parametrize(
    "prompt, level", [(5, 0), (10, 0), (11, 1), (30, 1), (31, 2), (70, 2), (71, 3), (5000, 3)]
)
def test_skip_join_places_job_in_first_queue_whose_quantum_covers_prefill(prompt, level):
    policy = mlfq()
    j = job("a", prompt=prompt)
    policy.add(j, 0.0)
    assert j.level == level


def test_naive_mlfq_joins_everything_at_q0():
    policy = mlfq("mlfq")
    j = job("a", prompt=5000)
    policy.add(j, 0.0)
    assert j.level == 0


def test_demotion_at_quantum_exhaustion_resets_account_and_goes_to_tail():
    policy = mlfq("mlfq")
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        policy.add(j, 0.0)
    assert policy.on_iteration_done([a], 0.015, 1.0) == []
    assert a.level == 0 and a.quantum_used == pytest.approx(0.015)
    (t,) = policy.on_iteration_done([a], 0.01, 2.0)  # 0.025 >= q0 = 0.02
    assert (t.kind, t.from_level, t.to_level) == ("demoted", 0, 1)
    assert a.level == 1 and a.quantum_used == 0 and a.demotions == 1
    assert [j.request_id for j in policy.order(2.0)] == ["b", "c", "a"]


def test_unfinished_job_keeps_its_place_and_higher_priority_arrival_preempts():
    policy = mlfq("mlfq")
    long = job("long")
    policy.add(long, 0.0)
    policy.on_iteration_done([long], 0.03, 1.0)  # demoted to Q1
    short = job("short", arrival=1.0)
    policy.add(short, 1.0)
    batch = form_batch(policy.order(1.0), BatchLimits(max_batch_size=1))
    assert [j.request_id for j in batch] == ["short"]


def test_last_queue_never_demotes_further():
    policy = mlfq("mlfq")
    a = job("a")
    policy.add(a, 0.0)
    for t in range(20):
        policy.on_iteration_done([a], 1.0, float(t))
    assert a.level == 3


def test_starvation_promotes_to_q0_only_on_check_iterations():
    policy = mlfq("mlfq", starvation_threshold=5.0, starvation_period=3)
    runner, starved = job("runner"), job("starved")
    policy.add(runner, 0.0)
    policy.add(starved, 0.0)
    policy.on_iteration_done([starved], 1.0, 1.0)  # demoted to Q1, last ran at t=1
    assert starved.level == 1
    assert policy.on_iteration_done([runner], 0.001, 7.0) == []  # 6 s starved, but iteration 2 is no check
    assert starved.level == 1
    transitions = policy.on_iteration_done([runner], 0.001, 8.0)  # check: 7s without running >= 5s
    assert [(t.kind, t.request_id, t.from_level, t.to_level) for t in transitions] == [
        ("promoted", "starved", 1, 0)
    ]
    assert starved.level == 0 and starved.promotions == 1


def test_finished_jobs_in_the_batch_are_ignored():
    policy = mlfq()
    a = job("a")
    policy.add(a, 0.0)
    policy.remove("a")
    assert policy.on_iteration_done([a], 1.0, 1.0) == []


def test_srpt_orders_by_remaining_tokens_then_arrival():
    policy = make_policy(PolicyConfig(name="srpt-oracle"))
    policy.add(job("a", max_tokens=50, output_len=30), 0.0)
    policy.add(job("b", max_tokens=50, output_len=10, arrival=1.0), 1.0)
    policy.add(job("c", max_tokens=50, output_len=10, arrival=2.0), 2.0)
    assert [j.request_id for j in policy.order(3.0)] == ["b", "c", "a"]


def test_fcfs_is_arrival_order():
    policy = make_policy(PolicyConfig(name="fcfs"))
    for rid in "xyz":
        policy.add(job(rid), 0.0)
    assert [j.request_id for j in policy.order(0.0)] == ["x", "y", "z"]


def test_form_batch_respects_size_tokens_blocks_and_pipeline_slots():
    jobs = [
        job("p", prompt=100),
        job("d1", prompt=10, needs_prefill=False),
        job("d2", prompt=10, needs_prefill=False),
        job("big", prompt=300),
        job("d3", prompt=10, needs_prefill=False),
    ]
    assert [j.request_id for j in form_batch(jobs, BatchLimits(max_batch_size=2))] == ["p", "d1"]
    assert [j.request_id for j in form_batch(jobs, BatchLimits(16, max_batched_tokens=250))] == [
        "p",
        "d1",
        "d2",
        "d3",
    ]
    assert [j.request_id for j in form_batch(jobs, BatchLimits(16, 2048), busy={"p", "d2"})] == [
        "d1",
        "big",
        "d3",
    ]
    chosen = form_batch(
        jobs, BatchLimits(16, 2048), free_blocks=8, block_size=16, blocks_held={"d1": 1, "d2": 1}
    )
    assert [j.request_id for j in chosen] == ["p", "d1", "d2", "d3"]  # big needs 19 blocks


def test_invalid_knobs_are_refused():
    with pytest.raises(ValueError, match="num-queues"):
        make_policy(PolicyConfig(name="mlfq", num_queues=0, base_quantum=0.1))
    with pytest.raises(ValueError, match="unknown"):
        make_policy(PolicyConfig(name="lifo"))


def test_enst_is_min_of_starvation_and_drain_time():
    est = EnstEstimator(max_batch_size=2, starvation_threshold=10.0, quantum=lambda level: 1.0 * 2**level)
    est.observe(0.1)
    a, b, c = job("a", last_run_time=9.0), job("b", last_run_time=9.0), job("c", last_run_time=0.5)
    enst = est([a, b, c], now=10.0)
    assert enst["a"] == 0.0
    assert enst["b"] == pytest.approx(0.5)  # a's 1 s of quantum left, over 2 batch slots
    assert enst["c"] == pytest.approx(0.5)  # starvation: 10 - 9.5 = 0.5 < 2 s of work over 2 slots = 1.0
    assert EnstEstimator(2, None, None, by="priority")([a, b, c], 10.0) == {"a": 0.0, "b": 1.0, "c": 2.0}


def test_base_quantum_defaults_to_one_decode_iteration_of_the_cost_model():
    cost = CostModel(c0=0.02, c_decode=0.001)
    policy = make_policy(PolicyConfig(name="skip-join-mlfq", base_quantum=None, num_queues=3), cost)
    assert [policy.quantum(i) for i in range(3)] == pytest.approx([0.021, 0.042, 0.084])


def test_every_policy_is_built_the_same_way():
    from fastserve.services.scheduler.policy import POLICIES

    for name in POLICIES:
        policy = make_policy(PolicyConfig(name=name), CostModel())
        assert policy.name == name
        a = job("a")
        a.predicted_len = 5  # the predicted-* policies refuse a job without one
        policy.add(a, 0.0)
        assert [j.request_id for j in policy.order(0.0)] == ["a"]


def test_starvation_promotes_longest_waiting_first_and_skips_recent_runners():
    policy = mlfq("mlfq", starvation_threshold=2.0, starvation_period=4)
    jobs = {rid: job(rid, arrival=t) for rid, t in (("old", 0.0), ("mid", 1.0), ("new", 2.5))}
    for j in jobs.values():
        policy.add(j, j.arrival_time)
        policy.on_iteration_done([j], 1.0, j.arrival_time)  # ran once at its arrival: demoted to Q1
    assert {j.level for j in jobs.values()} == {1}
    transitions = policy.on_iteration_done([], 0.0, 3.5)  # old idle 3.5 s, mid 2.5 s, new 1.0 s
    assert [(t.request_id, t.kind, t.from_level, t.to_level) for t in transitions] == [
        ("old", "promoted", 1, 0),
        ("mid", "promoted", 1, 0),
    ]
    assert jobs["new"].level == 1
    later = [t for _ in range(4) for t in policy.on_iteration_done([], 0.0, 3.6)]
    assert later == []  # the next check: old and mid are at Q0 already, new is not yet starved


def test_readding_a_job_does_not_duplicate_it():
    for name in ("mlfq", "srpt-oracle", "fcfs"):
        policy = make_policy(PolicyConfig(name=name, base_quantum=0.02), CostModel())
        a = job("a", output_len=5)
        policy.add(a, 0.0)
        policy.add(a, 0.0)
        assert [j.request_id for j in policy.order(0.0)] == ["a"], name
        policy.remove("a")
        assert list(policy.order(0.0)) == [], name


def test_srpt_incremental_order_matches_a_full_sort():
    import random

    rng = random.Random(0)
    policy = make_policy(PolicyConfig(name="srpt-oracle"))
    live = {}
    for step in range(400):
        if rng.random() < 0.3 or not live:
            j = job(f"j{step}", arrival=float(step), output_len=rng.randint(1, 40))
            live[j.request_id] = j
            policy.add(j, float(step))
        batch = form_batch(policy.order(step), BatchLimits(max_batch_size=4))
        for j in batch:
            j.num_generated += 1
            if j.num_generated >= j.output_len:
                policy.remove(j.request_id)
                del live[j.request_id]
        policy.on_iteration_done(batch, 0.01, float(step))
        expected = sorted(live.values(), key=lambda j: (j.output_len - j.num_generated, j.arrival_time))
        assert [j.request_id for j in policy.order(step)] == [j.request_id for j in expected]


def test_mlfq_order_is_level_then_queue_position():
    policy = mlfq("mlfq")
    a, b, c = job("a"), job("b"), job("c")
    for j in (a, b, c):
        policy.add(j, 0.0)
    policy.on_iteration_done([a, b], 0.03, 1.0)  # both demoted to Q1, a first
    d = job("d", arrival=1.0)
    policy.add(d, 1.0)
    assert [j.request_id for j in policy.order(1.0)] == ["c", "d", "a", "b"]


def test_form_batch_kv_need_is_the_context_in_blocks():
    exact = job("exact", prompt=32, needs_prefill=False)  # 32 tokens = 2 blocks of 16
    assert form_batch([exact], BatchLimits(), free_blocks=2, block_size=16) == [exact]
    assert form_batch([exact], BatchLimits(), free_blocks=1, block_size=16) == []
    assert form_batch([exact], BatchLimits(), free_blocks=0, blocks_held={"exact": 2}) == [exact]


def test_form_batch_looks_ahead_a_bounded_number_of_jobs():
    from fastserve.services.scheduler.policy.base import LOOKAHEAD

    big = [job(f"big{i}", prompt=3000) for i in range(LOOKAHEAD + 1)]
    small = job("small", prompt=10)
    assert form_batch([*big, small], BatchLimits()) == []
    assert form_batch([*big, small], BatchLimits(), lookahead=None) == [small]
    assert form_batch([*big[:LOOKAHEAD], small], BatchLimits()) == [small]


def test_form_batch_draws_lazily_from_the_order():
    drawn = []

    def order():
        for i in range(1000):
            drawn.append(i)
            yield job(str(i), needs_prefill=False)

    assert len(form_batch(order(), BatchLimits(max_batch_size=16))) == 16
    assert len(drawn) <= 17


def test_jobs_without_kv_start_only_into_blocks_free_in_either_tier():
    from fastserve.services.scheduler.policy.base import LOOKAHEAD

    # many new arrivals ahead of one job that holds KV; 3 blocks free across both tiers
    new = [job(f"new{i}", prompt=40) for i in range(LOOKAHEAD + 10)]  # 3 blocks each
    holder = job("holder", prompt=400, needs_prefill=False)
    batch = form_batch([*new, holder], BatchLimits(max_batch_size=4), block_size=16, admit_blocks=3)
    assert batch == [new[0], holder]  # one new job fits; the rest wait, and the walk reaches the holder
    dropped = job("dropped", prompt=40, num_generated=20, needs_prefill=True)  # KV dropped for recompute
    assert form_batch([dropped], BatchLimits(), block_size=16, admit_blocks=3) == []  # 60 tokens: 4 blocks
    assert form_batch([dropped], BatchLimits(), block_size=16, admit_blocks=4) == [dropped]


def test_a_new_job_that_does_not_fit_is_not_overtaken_by_smaller_new_jobs():
    big, small = job("big", prompt=96), job("small", prompt=16)  # 6 blocks and 1 block
    holder = job("holder", prompt=16, needs_prefill=False)
    assert form_batch([big, small, holder], BatchLimits(), block_size=16, admit_blocks=5) == [holder]
    # a new job refused for admission uses none of the GPU budget the next job needs
    first, second = job("first", prompt=64), job("second", prompt=64, needs_prefill=False)
    chosen = form_batch([first, second], BatchLimits(), free_blocks=4, block_size=16, admit_blocks=3)
    assert chosen == [second]


def test_a_restored_job_goes_back_to_its_level_and_account():
    policy = mlfq()
    new, back = job("new", prompt=5), job("back", prompt=5)  # skip-join would put both in Q0
    policy.add(new, 0.0)
    policy.add_at(back, 0.0, level=2, account=0.07)
    assert (back.level, back.quantum_used) == (2, pytest.approx(0.07))
    assert [j.request_id for j in policy.order(0.0)] == ["new", "back"]
    (t,) = policy.on_iteration_done([back], 0.011, 1.0)  # 0.081 >= q2 = 0.08: the account carried over
    assert (t.kind, t.from_level, t.to_level) == ("demoted", 2, 3)
    deep = job("deep")
    policy.add_at(deep, 0.0, level=9, account=0.0)  # fewer queues after the restart: the last one
    assert deep.level == 3


def test_policies_without_queues_add_a_restored_job_as_new():
    policy = make_policy(PolicyConfig(name="fcfs"))
    a = job("a")
    policy.add_at(a, 0.0, level=2, account=0.5)
    assert [j.request_id for j in policy.order(0.0)] == ["a"] and a.level == 0
