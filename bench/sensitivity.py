"""Knob sensitivity of skip-join MLFQ (the paper never measured it), in simulation.

Varies one knob at a time around a base setting -- quantum ratio, base quantum (as
a multiple of one batch-1 decode iteration), starvation threshold α, number of
queues -- on each workload, and reports for every value the throughput at the SLO
(mean and P95 latency per output token, interpolated over a rate sweep) and the
mean latency per output token at a reference rate. The base setting is the
artifact's (ratio 2, base = one decode iteration, 16 queues, check every 1000
iterations) with α = --alpha (default: the scheduler's, SLO x mean output = 101 s).
Each run follows the artifact's protocol: 200 s of Poisson arrivals, at most 400 requests.

    python -m fastserve.bench.sensitivity --json s.json --plot s.png            # both workloads
    python -m fastserve.bench.sensitivity --workload alpaca --alpha 3 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import os

from fastserve.bench.report import format_throughput, sweep_throughput
from fastserve.bench.simulator import SimConfig, requests_at, run_points
from fastserve.services.scheduler.policy import BatchLimits, CostModel, PolicyConfig

# base quantum values are multiples of one decode iteration (batch 1) of the cost model
KNOBS: dict[str, list[float]] = {
    "quantum_ratio": [1.5, 2.0, 4.0, 8.0],
    "base_quantum": [0.5, 1.0, 2.0, 4.0, 8.0],
    "starvation_threshold": [1.0, 3.0, 10.0, 30.0, 100.0, 1e9],
    "num_queues": [2, 4, 8, 16, 32],
}
RATES = {
    "sharegpt": [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0],
    "alpaca": [5.0, 10.0, 12.0, 14.0, 17.0, 20.0, 25.0, 30.0, 40.0, 50.0, 60.0],
}
REFERENCE_RATE = {"sharegpt": 1.5, "alpaca": 10.0}


def label(knob: str, value: float) -> str:
    if knob == "base_quantum":
        return f"{value:g}x"
    if knob == "starvation_threshold" and value >= 1e9:
        return "off"
    return f"{value:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.sensitivity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--workload", default="sharegpt,alpaca", help="comma list")
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--duration", type=float, default=200.0, help="seconds of arrivals (0 = no cap)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cost-model", default="opt-13b-a100")
    parser.add_argument(
        "--alpha",
        type=float,
        default=PolicyConfig.starvation_threshold,
        help="α (s) held fixed while the other knobs vary",
    )
    parser.add_argument("--knobs", default=",".join(KNOBS), help="comma list of knobs to vary")
    parser.add_argument("--sharegpt-rates", default=",".join(map(str, RATES["sharegpt"])))
    parser.add_argument("--alpaca-rates", default=",".join(map(str, RATES["alpaca"])))
    parser.add_argument("--slo", type=float, default=0.3)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(argv)
    cost_model = CostModel.resolve(args.cost_model)
    decode = cost_model.decode_time(1)
    base = {
        "quantum_ratio": 2.0,
        "base_quantum": 1.0,
        "num_queues": 16,
        "starvation_threshold": args.alpha,
        "starvation_period": 1000,
    }
    rates = {
        "sharegpt": [float(r) for r in args.sharegpt_rates.split(",")],
        "alpaca": [float(r) for r in args.alpaca_rates.split(",")],
    }
    knobs = args.knobs.split(",")
    # one simulated sweep per distinct setting (the base setting recurs in every knob's row)
    settings: dict[tuple, dict] = {}
    rows = []
    for workload in args.workload.split(","):
        for knob in knobs:
            for value in KNOBS[knob]:
                setting = {**base, knob: value}
                key = (workload, *sorted(setting.items()))
                settings.setdefault(key, {"workload": workload, "setting": setting})
                rows.append({"workload": workload, "knob": knob, "value": value, "key": key})
    tasks, owners = [], []
    for key, entry in settings.items():
        setting = entry["setting"]
        config = SimConfig(
            policy="skip-join-mlfq",
            limits=BatchLimits(16, 2048),
            policy_config=PolicyConfig(
                base_quantum=setting["base_quantum"] * decode,
                quantum_ratio=setting["quantum_ratio"],
                num_queues=int(setting["num_queues"]),
                starvation_threshold=setting["starvation_threshold"],
                starvation_period=int(setting["starvation_period"]),
            ),
        )
        for rate in rates[entry["workload"]]:
            tasks.append(
                (
                    entry["workload"],
                    requests_at(rate, args.num_requests, args.duration),
                    rate,
                    1.0,
                    args.seed,
                    config,
                    cost_model,
                    args.slo,
                    False,
                )
            )
            owners.append(key)
    print(
        f"{len(settings)} settings x rates = {len(tasks)} simulated runs of up to {args.num_requests} requests "
        f"(base: {base}, base quantum unit {decode * 1e3:.1f} ms)",
        flush=True,
    )
    points = run_points(tasks, args.jobs, desc="sensitivity")
    by_key: dict[tuple, list[dict]] = {}
    for key, point in zip(owners, points, strict=True):
        by_key.setdefault(key, []).append(point)

    results = []
    print(
        f"\n{'workload':<9}{'knob':<22}{'value':>7}{'tput mean':>11}{'tput p95':>10}"
        f"{'lat/tok @ref':>14}{'demotions':>11}{'promotions':>11}"
    )
    for row in rows:
        workload, knob, value = row["workload"], row["knob"], row["value"]
        sweep = by_key[row["key"]]
        tput = sweep_throughput(sweep, args.slo)["skip-join-mlfq"]
        ref = min(sweep, key=lambda p: abs(p["rate"] - REFERENCE_RATE.get(workload, p["rate"])))
        result = {
            "workload": workload,
            "knob": knob,
            "value": value,
            "label": label(knob, value),
            "is_default": value == base[knob],
            "throughput_at_slo": tput["mean"],
            "throughput_at_slo_p95": tput["p95"],
            "throughput_status": tput["mean_status"],
            "max_rate": tput["max_rate"],
            "reference_rate": ref["rate"],
            "latency_per_token_at_reference": ref["latency_per_token"]["mean"],
            "demotions_at_reference": ref["demotions"],
            "promotions_at_reference": ref["promotions"],
            "sweep": [
                {"rate": p["rate"], "latency_per_token": p["latency_per_token"], "ttft": p["ttft"]}
                for p in sweep
            ],
        }
        results.append(result)
        print(
            f"{workload:<9}{knob:<22}{result['label']:>7} {format_throughput(tput, 'mean'):>10}"
            f" {format_throughput(tput, 'p95'):>9}{result['latency_per_token_at_reference']:>14.4f}"
            f"{result['demotions_at_reference']:>11}{result['promotions_at_reference']:>11}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "base": base,
                    "base_quantum_unit_s": decode,
                    "cost_model": cost_model.to_dict(),
                    "num_requests": args.num_requests,
                    "slo": args.slo,
                    "rates": rates,
                    "reference_rate": REFERENCE_RATE,
                    "results": results,
                },
                f,
                indent=2,
            )
    if args.plot:
        from fastserve.bench.plot import plot_sensitivity

        plot_sensitivity(results, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
