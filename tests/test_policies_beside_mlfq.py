"""The policies a scheduling researcher would put beside MLFQ: LAS, Gittins, the vLLM preset."""

from __future__ import annotations

import pytest

from fastserve.bench.simulator import SimConfig, simulate
from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.planner import make_plan
from fastserve.services.scheduler.policy import (
    POLICIES,
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
    swap_policy_of,
)
from fastserve.services.scheduler.policy.gittins import MIN_FINISHED, IndexTable, prior_lengths


def job(rid: str, arrival: float = 0.0, prompt: int = 10, max_tokens: int = 100, **kw) -> Job:
    return Job(rid, prompt, max_tokens, arrival, **kw)


def ids(policy, now: float = 0.0) -> list[str]:
    return [j.request_id for j in policy.order(now)]


def test_gittins_index_of_a_two_point_distribution_matches_the_hand_computation():
    # X = 1 or 4 tokens, equally likely.
    # a = 0: look 1 ahead: P(X <= 1) / E[min(X, 1)] = 0.5 / 1 = 0.5;
    #        look 4 ahead: P(X <= 4) / E[X] = 1 / 2.5 = 0.4  ->  G(0) = 0.5
    # a = 1: only X = 4 is left: 1 / 3
    # a >= 4: nothing left: the lowest index, 0
    table = IndexTable([1, 4], weighted=False)
    assert table.index(0) == pytest.approx(0.5)
    assert table.index(1) == pytest.approx(1 / 3)
    assert table.index(3) == pytest.approx(1.0)
    assert table.index(4) == 0.0
    # weighted by 1/X: a = 0: look 1 ahead: (0.5 * 1) / 1 = 0.5; 4 ahead: (0.5 + 0.5/4) / 2.5 = 0.25
    # a = 1: (1/4) / 3 = 1/12
    slow = IndexTable([1, 4], weighted=True)
    assert slow.index(0) == pytest.approx(0.5)
    assert slow.index(1) == pytest.approx(1 / 12)


def test_gittins_index_of_three_points_takes_the_best_look_ahead():
    # X in {2, 3, 10} with probabilities 1/4, 1/4, 1/2, attained a = 1 (X > 1 always):
    # d = 1: P(X <= 2) = 1/4, E[min(X-1, 1)] = 1                  -> 0.25
    # d = 2: P(X <= 3) = 1/2, E[min(X-1, 2)] = 1/4 + 2 * 3/4 = 1.75 -> 0.2857
    # d = 9: 1, E[X - 1] = 1/4 * 1 + 1/4 * 2 + 1/2 * 9 = 5.25      -> 0.1905
    table = IndexTable([2, 3, 10, 10], weighted=False)
    assert table.index(1) == pytest.approx(0.5 / 1.75)


def test_gittins_learns_the_distribution_from_finished_jobs():
    policy = make_policy(PolicyConfig(name="gittins"))
    prior = policy.table
    assert sorted(prior.values) == sorted(set(prior_lengths()))
    # every job so far finished after exactly 5 tokens: one at 5 is about to finish, a new one is not
    for i in range(MIN_FINISHED):
        j = job(f"f{i}", arrival=float(i))
        policy.add(j, 0.0)
        j.num_generated = 5
        policy.completed(j)
        policy.remove(j.request_id)
    assert policy.table is not prior and policy.table.values == [5]
    fresh, nearly = job("fresh", arrival=1.0), job("nearly", arrival=2.0, num_generated=4)
    policy.add(fresh, 0.0)
    policy.add(nearly, 0.0)
    assert ids(policy) == ["nearly", "fresh"]  # 1 token left beats 5 under the learned distribution


def test_gittins_runs_the_job_the_distribution_says_is_nearly_done():
    policy = make_policy(PolicyConfig(name="gittins"))
    policy.table = IndexTable([1, 4] * 10, weighted=False)
    a, b = job("a", arrival=0.0), job("b", arrival=1.0)
    policy.add(a, 0.0)
    policy.add(b, 0.0)
    a.num_generated = 1  # a is now known to be a 4-token job: 3 left (index 1/3) vs b's 0.5
    policy.on_iteration_done([a], 0.01, 0.01)
    assert ids(policy) == ["b", "a"]
    b.num_generated = 3
    a.num_generated = 3  # both have one token left: index 1, the earlier arrival first
    policy.on_iteration_done([a, b], 0.01, 0.02)
    assert ids(policy) == ["a", "b"]


def test_las_orders_by_attained_service_then_arrival():
    policy = make_policy(PolicyConfig(name="las"))
    a, b, c = job("a", 0.0), job("b", 1.0), job("c", 2.0)
    for j in (a, b, c):
        policy.add(j, 0.0)
    assert ids(policy) == ["a", "b", "c"]  # nobody has run: arrival order
    policy.on_iteration_done([a, b], 0.05, 1.0)
    assert ids(policy) == ["c", "a", "b"]
    policy.on_iteration_done([c], 0.02, 2.0)  # c: 0.02 < a, b: 0.05
    policy.on_iteration_done([c], 0.02, 3.0)  # c: 0.04
    assert ids(policy) == ["c", "a", "b"]
    policy.on_iteration_done([c], 0.02, 4.0)  # c: 0.06
    assert ids(policy) == ["a", "b", "c"]
    d = job("d", 5.0)
    policy.add(d, 5.0)  # a new job has attained nothing: it goes first
    assert ids(policy)[0] == "d"
    policy.remove("a")
    assert ids(policy) == ["d", "b", "c"] and "a" not in policy.attained


def test_vllm_preset_is_fcfs_with_recompute():
    assert swap_policy_of("vllm", "proactive") == "recompute"
    assert swap_policy_of("skip-join-mlfq", "proactive") == "proactive"
    policy = make_policy(PolicyConfig(name="vllm"))
    for i, arrival in enumerate((2.0, 0.0, 1.0)):
        policy.add(job(f"j{i}", arrival), arrival)
    assert ids(policy) == ["j0", "j1", "j2"]  # arrival order = the order jobs were added


def test_vllm_preset_preempts_the_newest_running_job_when_kv_runs_out():
    policy = make_policy(PolicyConfig(name="vllm"))
    blocks = BlockManager(num_gpu_blocks=6, block_size=16, num_host_blocks=0)
    jobs = [job(name, arrival, prompt=32, needs_prefill=False) for arrival, name in enumerate("abc")]
    for j in jobs:
        policy.add(j, j.arrival_time)
        blocks.allocate(j.request_id, 32)  # 2 blocks each: the GPU is full
        j.num_generated = 1  # the next token starts a third block for every job
    batch = form_batch(policy.order(3.0), BatchLimits(16, 2048))
    assert [j.request_id for j in batch] == ["a", "b", "c"]
    plan = make_plan(blocks, [(j.request_id, j.context_len) for j in batch], [], swap_policy_of("vllm", ""))
    assert plan.recompute == ["c"]  # the most recently arrived gives up its KV, dropped (no swap)
    assert not plan.swap_out and set(plan.tables) == {"a", "b"}


def test_vllm_preset_recomputes_in_the_simulator_and_never_swaps():
    trace = [(0.01 * i, 200, 300) for i in range(12)]
    stats: dict = {}
    config = SimConfig(policy="vllm", num_gpu_blocks=120, swap_policy=swap_policy_of("vllm", "proactive"))
    records = simulate(trace, config, CostModel(c0=0.02, c_decode=1e-4), stats=stats)
    assert len(records) == 12
    assert stats["recomputes"] > 0 and stats["swap_out_blocks"] == 0


@pytest.mark.parametrize("name", ["las", "gittins", "gittins-slowdown", "vllm"])
def test_new_policies_finish_every_job_in_the_simulator(name):
    trace = [(0.05 * i, 20 + 7 * (i % 5), 5 + 13 * (i % 7)) for i in range(40)]
    config = SimConfig(policy=name, limits=BatchLimits(4, 512), num_gpu_blocks=200)
    records = simulate(trace, config, CostModel(c0=0.02, c_prefill=1e-4, c_decode=1e-4))
    assert len(records) == 40 and name in POLICIES


def test_policy_table_reads_a_sweep(tmp_path, capsys):
    from fastserve.bench.policy_table import main as table_main
    from fastserve.bench.simulator import main as simulate_main

    path = tmp_path / "sweep.json"
    argv = ["--workload", "alpaca", "--num-requests", "30", "--sweep-rates", "5,200", "--json", str(path)]
    assert simulate_main([*argv, "--policy", "fcfs,las"]) == 0
    capsys.readouterr()
    assert table_main([str(path), "--rates", "200"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| policy | tput mean | tput P95 | JCT s @200 |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| fcfs", "| las"]
