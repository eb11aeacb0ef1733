"""The simulator and its metrics, on small hand-checkable cases."""

from __future__ import annotations

import json

import pytest

from fastserve.bench.report import (
    format_throughput,
    slo_crossing,
    summarize,
    sweep_throughput,
    throughput_at_slo,
    throughput_table,
)
from fastserve.bench.simulator import OPT_13B_A100_BLOCKS, SimConfig, main, requests_at, run_point, simulate
from fastserve.bench.workloads import load_trace
from fastserve.services.scheduler.policy import BatchLimits, CostModel, PolicyConfig

COST = CostModel(c0=0.01)  # every iteration takes 10 ms


def times(records):
    """first token and finish of every record, flat (pytest.approx takes no nesting)."""
    return [t for r in records for t in (r["first_token"], r["finish"])]


def flat(pairs):
    return [t for pair in pairs for t in pair]


def test_fcfs_with_one_slot_runs_in_arrival_order_with_exact_times():
    trace = [(0.0, 10, 3), (0.001, 10, 2)]
    config = SimConfig(policy="fcfs", limits=BatchLimits(max_batch_size=1), num_host_blocks=0)
    first, second = simulate(trace, config, COST)
    assert times([first, second]) == pytest.approx(flat([(0.01, 0.03), (0.04, 0.05)]))
    assert first["preemptions"] == second["preemptions"] == 0


def test_batching_runs_jobs_together_and_idles_between_arrivals():
    trace = [(0.0, 10, 2), (0.0, 10, 3), (1.0, 10, 1)]
    records = simulate(trace, SimConfig(policy="fcfs"), COST)
    assert times(records) == pytest.approx(flat([(0.01, 0.02), (0.01, 0.03), (1.01, 1.01)]))


def test_cost_model_prices_prefill_and_decode():
    cost = CostModel(c0=0.01, c_prefill=0.001)
    (record,) = simulate([(0.0, 100, 3)], SimConfig(policy="fcfs"), cost)
    assert times([record]) == pytest.approx(flat([(0.11, 0.13)]))  # prefill 10 + 100 ms, then 2 x 10 ms


def test_skip_join_lets_a_short_job_overtake_a_long_one():
    trace = [(0.0, 10, 200), (0.5, 10, 2)]
    for policy, short_first in (
        ("skip-join-mlfq", True),
        ("mlfq", True),
        ("srpt-oracle", True),
        ("fcfs", False),
    ):
        config = SimConfig(policy=policy, limits=BatchLimits(max_batch_size=1))
        long, short = simulate(trace, config, COST)
        assert (short["finish"] < long["finish"]) is short_first, policy
        assert (long["preemptions"] == 1) is short_first, policy
    # skip-join: the short job runs at the first iteration boundary after it arrives
    trace = [(0.0, 10, 200), (0.505, 10, 2)]
    long, short = simulate(trace, SimConfig(policy="skip-join-mlfq", limits=BatchLimits(1)), COST)
    assert short["first_token"] == pytest.approx(0.52) and short["finish"] == pytest.approx(0.53)


def test_pipeline_slots_overlap_disjoint_batches():
    trace = [(0.0, 10, 10), (0.0, 10, 10)]
    one = simulate(trace, SimConfig(policy="fcfs", limits=BatchLimits(1), pp=1), COST)
    two = simulate(trace, SimConfig(policy="fcfs", limits=BatchLimits(1), pp=2), COST)
    assert max(r["finish"] for r in one) == pytest.approx(0.2)
    # a new batch every 5 ms, each taking 10 ms: job 0 at 0, 10, ..; job 1 at 5, 15, ..
    assert times(two) == pytest.approx(flat([(0.01, 0.1), (0.015, 0.105)]))


def test_pipeline_starts_a_batch_when_the_first_stage_frees_not_when_the_last_batch_ends():
    trace = [(0.0, 10, 5), (0.001, 10, 1)]
    first, second = simulate(trace, SimConfig(policy="fcfs", limits=BatchLimits(1), pp=2), COST)
    assert second["first_token"] == pytest.approx(0.015)  # started at 0.005, when stage 0 freed
    assert first["finish"] == pytest.approx(0.05)


def test_tiny_gpu_tier_forces_swaps_and_everything_still_finishes():
    trace = load_trace("alpaca", 60, rate=50.0, seed=1)
    config = SimConfig(policy="skip-join-mlfq", limits=BatchLimits(8), num_gpu_blocks=40, num_host_blocks=30)
    point = run_point(trace, config, COST)
    assert point["num_requests"] == 60 and point["unfinished"] == 0
    assert point["preemptions"] > 0 and point["sim"]["swap_out_blocks"] > 0


def test_without_a_host_tier_jobs_wait_for_kv_and_all_finish():
    trace = load_trace("alpaca", 60, rate=50.0, seed=1)
    config = SimConfig(policy="skip-join-mlfq", limits=BatchLimits(8), num_gpu_blocks=40, swap_policy="none")
    point = run_point(trace, config, COST)
    assert point["unfinished"] == 0
    assert point["sim"]["swap_in_blocks"] == point["sim"]["swap_out_blocks"] == 0


def test_a_job_too_big_for_the_gpu_is_reported_unfinished_and_the_run_ends():
    trace = [(0.0, 10, 2), (0.0, 500, 2)]  # 500 tokens need 32 blocks of 16; there are 8
    point = run_point(trace, SimConfig(policy="fcfs", num_gpu_blocks=8, num_host_blocks=0), COST)
    assert (point["num_requests"], point["unfinished"]) == (1, 1)


def test_starvation_promotion_reaches_the_records():
    # one long job hogs the single slot at a high level; a second long job waits past α
    trace = [(0.0, 10, 100), (0.0, 10, 100)]
    knobs = PolicyConfig(base_quantum=0.01, num_queues=3, starvation_threshold=0.1, starvation_period=1)
    records = simulate(trace, SimConfig(policy="mlfq", limits=BatchLimits(1), policy_config=knobs), COST)
    assert sum(r["promotions"] for r in records) > 0 and sum(r["demotions"] for r in records) > 0


def test_default_kv_capacity_is_opt_13b_on_a_40gb_a100():
    assert OPT_13B_A100_BLOCKS == int((0.9 * 40 * 2**30 - 26e9) / (2 * 40 * 5120 * 2 * 16)) == 965
    assert SimConfig().num_gpu_blocks == 965
    assert SimConfig().num_host_blocks == 32 * 2**30 // (2 * 40 * 5120 * 2 * 16) == 2621


def test_duration_caps_requests_like_the_artifacts_sweeps():
    # the artifact: 20 prompts at 0.1 req/s ... 400 from 2 req/s up
    assert [requests_at(r, 400, 200) for r in (0.1, 1.0, 2.0, 6.0)] == [20, 200, 400, 400]
    assert requests_at(6.0, 400, 0) == 400


def test_skip_join_beats_fcfs_past_saturation_at_paper_scale():
    # OPT-13B-like costs, batch 16, 200 s of arrivals at 2.5 req/s (above the ~1.8 req/s
    # FCFS can sustain): FCFS queues short jobs behind long ones, skip-join does not
    cost = CostModel.resolve("opt-13b-a100")
    trace = load_trace("sharegpt", requests_at(2.5, 400, 200), 2.5, 1.0, 0)
    mean = {}
    for policy in ("fcfs", "skip-join-mlfq"):
        point = run_point(trace, SimConfig(policy=policy), cost)
        assert point["unfinished"] == 0
        mean[policy] = point["latency_per_token"]["mean"]
    assert mean["skip-join-mlfq"] * 2 < mean["fcfs"], mean


def test_metrics_math_on_a_hand_built_case():
    records = [
        {"arrival": 0.0, "first_token": 1.0, "finish": 4.0, "output_tokens": 2, "preemptions": 1},
        {"arrival": 1.0, "first_token": 1.5, "finish": 2.0, "output_tokens": 4, "preemptions": 2},
    ]
    result = summarize(records, slo=1.0)
    assert result["jct"]["mean"] == pytest.approx(2.5)
    assert result["jct"]["p50"] == pytest.approx(2.5)
    assert result["jct"]["p99"] == pytest.approx(1.0 + 3.0 * 0.99)
    assert result["ttft"]["p50"] == pytest.approx(0.75)
    assert result["latency_per_token"]["mean"] == pytest.approx((2.0 + 0.25) / 2)
    assert result["tpot"]["mean"] == pytest.approx((3.0 / 1 + 0.5 / 3) / 2)
    assert result["slo_attainment"] == 0.5
    assert result["preemptions"] == 3 and result["num_requests"] == 2


def test_throughput_at_slo_interpolates_the_crossing():
    assert throughput_at_slo([(1, 0.1), (2, 0.2), (3, 0.5)], 0.3) == pytest.approx(2 + 1 / 3)
    assert throughput_at_slo([(3, 0.5), (1, 0.1), (2, 0.2)], 0.3) == pytest.approx(2 + 1 / 3)  # any order
    assert slo_crossing([(1, 0.4), (2, 0.5)], 0.3) == (None, "always_above")
    assert slo_crossing([(1, 0.1), (2, 0.2)], 0.3) == (None, "never_crossed")
    assert throughput_at_slo([(1, 0.1), (2, 0.2)], 0.3) is None
    # noisy sweeps: the first crossing counts
    assert throughput_at_slo([(1, 0.1), (2, 0.4), (3, 0.2), (4, 0.9)], 0.3) == pytest.approx(1 + 1 / 1.5)


def test_sweep_throughput_per_policy():
    def point(policy, rate, mean, p95):
        return {"policy": policy, "rate": rate, "latency_per_token": {"mean": mean, "p95": p95}}

    results = [
        point("a", 1, 0.1, 0.2),
        point("a", 2, 0.5, 0.9),
        point("b", 1, 0.1, 0.1),
        point("b", 2, 0.2, 0.2),
    ]
    tput = sweep_throughput(results, 0.3)
    assert tput["a"]["mean"] == pytest.approx(1.5) and tput["a"]["p95"] == pytest.approx(1 + 1 / 7)
    assert (
        tput["b"]["mean"] is None
        and tput["b"]["mean_status"] == "never_crossed"
        and tput["b"]["max_rate"] == 2
    )


def test_cli_writes_a_json_list_and_a_plot(tmp_path, capsys):
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    argv = ["--policy", "fcfs", "--policy", "skip-join-mlfq", "--workload", "alpaca", "--num-requests", "40"]
    assert main([*argv, "--sweep-rates", "2,400", "--json", str(out), "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    assert isinstance(data, list) and len(data) == 4
    assert {(r["policy"], r["rate"]) for r in data} == {
        (p, r) for p in ("fcfs", "skip-join-mlfq") for r in (2, 400)
    }
    for r in data:
        assert set(r) >= {"policy", "rate", "num_requests", "jct", "ttft", "latency_per_token", "preemptions"}
        assert set(r["latency_per_token"]) == {"mean", "p50", "p95", "p99"}
        assert set(r["throughput_at_slo"]) >= {"mean", "p95"}
    assert plot.stat().st_size > 0
    assert "throughput at SLO" in capsys.readouterr().out


def test_throughput_text_says_which_side_of_the_sweep():
    tput = sweep_throughput(
        [
            {"policy": "p", "rate": r, "latency_per_token": {"mean": m, "p95": q}}
            for r, m, q in ((2, 0.1, 0.4), (4, 0.5, 0.6))
        ],
        0.3,
    )["p"]
    assert format_throughput(tput, "mean") == "3.00"
    assert format_throughput(tput, "p95") == "<2"  # above the SLO already at the lowest rate
    assert format_throughput({"mean": None, "mean_status": "never_crossed", "max_rate": 4}) == ">4"


def test_throughput_table_keeps_columns_apart():
    """A crossing next to a sweep-edge value once printed as '0.20below sweep'."""
    edge = {"mean": 0.2, "mean_status": "crossed", "p95": None, "p95_status": "always_above"}
    lines = throughput_table({"a-policy-name-longer-than-the-column": {**edge, "min_rate": 0.25}})
    assert lines[1].split() == ["a-policy-name-longer-than-the-column", "0.20", "<0.25"]


def test_cli_throughput_table_has_three_fields_per_line(capsys):
    """Every policy misses a tiny SLO at every rate: each line reads 'name <lowest <lowest'."""
    argv = ["--policy", "fcfs,skip-join-mlfq", "--workload", "alpaca", "--num-requests", "20"]
    assert main([*argv, "--sweep-rates", "2,4", "--slo", "1e-6"]) == 0
    table = capsys.readouterr().out.split("throughput at SLO")[1].splitlines()[1:]
    assert [line.split() for line in table] == [
        ["policy", "mean", "p95"],
        ["fcfs", "<2", "<2"],
        ["skip-join-mlfq", "<2", "<2"],
    ]


def test_cli_refuses_unknown_policy():
    with pytest.raises(SystemExit, match="lifo"):
        main(["--policy", "fcfs,lifo"])
