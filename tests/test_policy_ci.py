"""fastserve.bench.policy_ci: paired gap-closed intervals, throughput at the SLO per seed, noisy-oracle thresholds."""

from __future__ import annotations

import json

import pytest

from fastserve.bench.load import trace_prompts
from fastserve.bench.policy_ci import aggregate, kendall_tau, parse_policy, thresholds


def point(policy: str, seed: int, lat: float, rate: float = 3.0, noise: float = -1.0, tau=None) -> dict:
    return {
        "tag": "", "workload": "w", "noise": noise, "policy": policy, "rate": rate, "seed": seed,
        "unfinished": 0, "lat_mean": lat, "lat_p95": lat, "lat_p99": lat, "jct_mean": lat,
        "ttft_mean": 0.0, "preemptions": 0, "swap_gb": 0.0, "recomputes": 0, "tau": tau,
    }  # fmt: skip


def test_gap_closed_is_paired_per_seed():
    # seed 0: skip 10, oracle 0, p 5 -> 50 %; seed 1: skip 20, oracle 10, p 12 -> 80 %
    points = [
        point("skip-join-mlfq", 0, 10.0), point("srpt-oracle", 0, 0.0), point("p", 0, 5.0),
        point("skip-join-mlfq", 1, 20.0), point("srpt-oracle", 1, 10.0), point("p", 1, 12.0),
    ]  # fmt: skip
    row = next(r for r in aggregate(points) if r["policy"] == "p")
    assert row["gap_closed_lat_mean"]["mean"] == pytest.approx(0.65)
    assert row["lat_mean"]["mean"] == pytest.approx(8.5)
    assert row["lat_mean"]["lo"] < 8.5 < row["lat_mean"]["hi"]


def test_throughput_at_the_slo_is_found_per_seed_then_averaged():
    # crosses 0.3 halfway between rates 2 and 4 in both seeds: 3.0
    points = [point("a", s, lat, rate) for s in (0, 1) for rate, lat in ((2.0, 0.2), (4.0, 0.4))]
    t = aggregate(points)[0]["throughput_at_slo"]["mean"]
    assert (t["crossed"], t["mean"]) == (2, pytest.approx(3.0))


def test_the_noisy_oracle_threshold_is_where_the_gap_closed_turns_positive():
    points = [point("skip-join-mlfq", 0, 10.0), point("srpt-oracle", 0, 0.0)]
    for noise, tau, lat in ((2.0, 0.4, 12.0), (1.0, 0.6, 8.0)):  # gap closed -20 % at 0.4, +20 % at 0.6
        points.append(point("p", 0, lat, noise=noise, tau=tau))
    (entry,) = thresholds(aggregate(points))
    assert entry["lat_mean"] == "0.50"


def test_policy_labels_and_tau():
    assert parse_policy("vllm@256") == ("vllm", None, 256)
    assert parse_policy("skip-join-mlfq/recompute") == ("skip-join-mlfq", "recompute", None)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)


def test_a_trace_with_prompt_ids_sends_them(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(json.dumps({"input_len": 2, "output_len": 3, "prompt_ids": [5, 6]}) for _ in range(3))
    )
    assert trace_prompts(str(path), 2) == [[5, 6], [5, 6]]
    assert trace_prompts("alpaca", 2) is None
