"""The simulator and its workloads, on small hand-checkable cases."""

from __future__ import annotations

import json
import statistics

import pytest

from bench.report import summarize, throughput_at_slo
from bench.simulator import SimConfig, main, simulate
from bench.workloads import arrivals, load_dataset, load_trace, synthetic_lengths
from services.scheduler.policy import BatchLimits, CostModel

COST = CostModel(c0=0.01)  # every iteration takes 10 ms


def test_fcfs_with_one_slot_runs_in_arrival_order_with_exact_times():
    trace = [(0.0, 10, 3), (0.001, 10, 2)]
    config = SimConfig(
        policy="fcfs", limits=BatchLimits(max_batch_size=1), num_gpu_blocks=100, num_host_blocks=0
    )
    first, second = simulate(trace, config, COST)
    assert (first["first_token"], first["finish"]) == pytest.approx((0.01, 0.03))
    assert (second["first_token"], second["finish"]) == pytest.approx((0.04, 0.05))


def test_skip_join_lets_a_short_job_overtake_a_long_one():
    trace = [(0.0, 10, 200), (0.5, 10, 2)]
    for policy, short_first in (("skip-join-mlfq", True), ("fcfs", False)):
        config = SimConfig(policy=policy, limits=BatchLimits(max_batch_size=1), num_gpu_blocks=100)
        long, short = simulate(trace, config, COST)
        assert (short["finish"] < long["finish"]) is short_first, policy
        assert (long["preemptions"] > 0) is short_first


def test_pipeline_slots_overlap_batches():
    trace = [(0.0, 10, 10), (0.0, 10, 10)]
    one = simulate(trace, SimConfig(policy="fcfs", limits=BatchLimits(1), pp=1), COST)
    two = simulate(trace, SimConfig(policy="fcfs", limits=BatchLimits(1), pp=2), COST)
    assert max(r["finish"] for r in two) < max(r["finish"] for r in one)


def test_tiny_gpu_tier_forces_swaps_and_everything_still_finishes():
    trace = load_trace("alpaca", 60, rate=50.0, seed=1)
    config = SimConfig(policy="skip-join-mlfq", limits=BatchLimits(8), num_gpu_blocks=40, num_host_blocks=30)
    records = simulate(trace, config, COST)
    assert len(records) == 60 and sum(r["preemptions"] for r in records) > 0


def test_metrics_math_on_a_hand_built_case():
    records = [
        {"arrival": 0.0, "first_token": 1.0, "finish": 4.0, "output_tokens": 2},
        {"arrival": 1.0, "first_token": 1.5, "finish": 2.0, "output_tokens": 4},
    ]
    result = summarize(records, slo=1.0)
    assert result["jct"]["mean"] == pytest.approx(2.5)
    assert result["ttft"]["p50"] == pytest.approx(0.75)
    assert result["latency_per_token"]["mean"] == pytest.approx((2.0 + 0.25) / 2)
    assert result["slo_attainment"] == 0.5


def test_throughput_at_slo_interpolates_the_crossing():
    assert throughput_at_slo([(1, 0.1), (2, 0.2), (3, 0.5)], 0.3) == pytest.approx(2 + 1 / 3)
    assert throughput_at_slo([(1, 0.4)], 0.3) is None
    assert throughput_at_slo([(1, 0.1), (2, 0.2)], 0.3) == 2


def test_synthetic_workloads_match_published_means_with_a_heavy_tail():
    for name, (inp, out) in {"sharegpt": (161, 338), "alpaca": (19, 58)}.items():
        lengths = synthetic_lengths(name, 40000, seed=0)
        ins, outs = [i for i, _ in lengths], [o for _, o in lengths]
        assert statistics.mean(ins) == pytest.approx(inp, rel=0.05), name
        assert statistics.mean(outs) == pytest.approx(out, rel=0.05), name
        assert statistics.median(outs) < 0.8 * statistics.mean(outs)  # right-skewed
        assert max(ins) <= 1024 and max(i + o for i, o in lengths) <= 2048


def test_gamma_arrivals_have_the_requested_rate_and_cv():
    times = arrivals(20000, rate=4.0, cv=2.0, seed=0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.05)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(2.0, rel=0.1)


def test_dataset_loader_applies_the_artifact_filters(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": "x y"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},  # both < 4
        {"conversations": [{"from": "human", "value": "w " * 1100}, {"from": "gpt", "value": "y"}]},  # > 1024
        {"instruction": "one two", "input": "three", "output": "four five six seven eight"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    assert load_dataset(str(path), str.split) == [(5, 2), (3, 5)]


def test_cli_writes_json_and_plot(tmp_path):
    out, plot = tmp_path / "sim.json", tmp_path / "sim.png"
    main(
        [
            "--policy",
            "fcfs,skip-join-mlfq",
            "--workload",
            "alpaca",
            "--num-requests",
            "50",
            "--sweep-rates",
            "2,8",
            "--json",
            str(out),
            "--plot",
            str(plot),
        ]
    )
    data = json.loads(out.read_text())
    assert {r["policy"] for r in data["results"]} == {"fcfs", "skip-join-mlfq"}
    assert all(
        set(r) >= {"policy", "rate", "num_requests", "jct", "ttft", "latency_per_token", "preemptions"}
        for r in data["results"]
    )
    assert len(data["throughput"]) == 2 and plot.stat().st_size > 0
