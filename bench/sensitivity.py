"""Knob sensitivity of skip-join MLFQ, which the paper never measured.

Varies one knob at a time around the defaults (ratio, base quantum, starvation
threshold α, queue count) and reports throughput at the SLO (mean latency per
output token) on each workload, from a simulated rate sweep.
"""

from __future__ import annotations

import argparse
import json

from bench.report import summarize, throughput_at_slo
from bench.simulator import SimConfig, simulate
from bench.workloads import load_trace
from services.scheduler.policy import CostModel, PolicyConfig

KNOBS = {
    "quantum_ratio": [1.5, 2.0, 4.0, 8.0],
    "base_quantum": [0.005, 0.01, 0.021, 0.05, 0.1],
    "starvation_threshold": [1.0, 3.0, 10.0, 30.0, 100.0, 1e9],
    "num_queues": [2, 4, 8, 16, 32],
}
RATES = {"sharegpt": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "alpaca": [5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 40.0]}


def throughput(
    workload: str, knobs: dict, cost_model: CostModel, num_requests: int, slo: float
) -> float | None:
    points = []
    for rate in RATES[workload]:
        trace = load_trace(workload, num_requests, rate, 1.0, 0)
        config = SimConfig(policy="skip-join-mlfq", policy_config=PolicyConfig(**knobs))
        records = simulate(trace, config, cost_model)
        points.append((rate, summarize(records, slo)["latency_per_token"]["mean"]))
    return throughput_at_slo(points, slo)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sensitivity", description=__doc__)
    parser.add_argument("--workload", default="sharegpt,alpaca")
    parser.add_argument("--num-requests", type=int, default=500)
    parser.add_argument("--cost-model", default="opt-13b-a100")
    parser.add_argument(
        "--starvation-threshold", type=float, default=100.0, help="α held fixed while others vary"
    )
    parser.add_argument("--slo", type=float, default=0.3)
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(argv)
    cost_model = CostModel.resolve(args.cost_model)
    defaults = {
        "quantum_ratio": 2.0,
        "base_quantum": cost_model.decode_time(1),
        "num_queues": 16,
        "starvation_threshold": args.starvation_threshold,
        "starvation_period": 1000,
    }
    results = []
    for workload in args.workload.split(","):
        for knob, values in KNOBS.items():
            for value in values:
                tput = throughput(
                    workload, {**defaults, knob: value}, cost_model, args.num_requests, args.slo
                )
                results.append(
                    {"workload": workload, "knob": knob, "value": value, "throughput_at_slo": tput}
                )
                print(
                    f"{workload:<9} {knob:<21} {value:>10g}  throughput at SLO {tput if tput is None else round(tput, 2)}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"defaults": defaults, "results": results}, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        workloads = args.workload.split(",")
        fig, axes = plt.subplots(
            len(workloads), len(KNOBS), figsize=(4 * len(KNOBS), 3 * len(workloads)), squeeze=False
        )
        for row, workload in enumerate(workloads):
            for col, knob in enumerate(KNOBS):
                pts = [
                    (r["value"], r["throughput_at_slo"] or 0)
                    for r in results
                    if r["workload"] == workload and r["knob"] == knob
                ]
                axes[row][col].plot([str(v) for v, _ in pts], [t for _, t in pts], marker="o")
                axes[row][col].set_title(f"{workload}: {knob}")
                axes[row][col].set_ylabel("req/s at SLO")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
