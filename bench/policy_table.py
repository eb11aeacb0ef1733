"""Markdown tables of a `fastserve simulate --sweep-rates ... --json` result, one row per policy.

    python -m fastserve.bench.policy_table docs/results/why_sharegpt_real.json --rates 3,5

Columns: throughput at the SLO (mean and P95 latency per output token, req/s, interpolated
over the sweep; `>x`: never crossed up to x), then at each `--rates` load: mean job
completion time, P99 latency per output token (the fairness tail), preemptions, KV
traffic over the host link (swap-outs + swap-ins + prefetches, GB) and recomputes.
"""

from __future__ import annotations

import argparse
import json
import sys

from fastserve.bench.report import format_throughput


def rows(results: list[dict], rates: list[float]) -> list[str]:
    by_policy: dict[str, dict[float, dict]] = {}
    for r in results:
        by_policy.setdefault(r["group"] if "group" in r else r["policy"], {})[r["rate"]] = r
    head = "| policy | tput mean | tput P95 |"
    rule = "|---|---:|---:|"
    for rate in rates:
        head += f" JCT s @{rate:g} | P99 s/tok @{rate:g} | preempt @{rate:g} | swap GB @{rate:g} | recomp @{rate:g} |"
        rule += "---:|---:|---:|---:|---:|"
    lines = [head, rule]
    for name, points in by_policy.items():
        first = next(iter(points.values()))
        tput = first.get("throughput_at_slo", {})
        line = f"| {name} | {format_throughput(tput, 'mean') if tput else '-'} | "
        line += f"{format_throughput(tput, 'p95') if tput else '-'} |"
        for rate in rates:
            p = points.get(rate)
            if p is None:
                line += " - | - | - | - | - |"
                continue
            sim, cfg = p["sim"], p.get("config", {})
            block_bytes = cfg.get("kv_bytes_per_token", 0) * cfg.get("block_size", 0)
            moved = sim["swap_out_blocks"] + sim["swap_in_blocks"] + sim["prefetch_blocks"]
            line += (
                f" {p['jct']['mean']:.1f} | {p['latency_per_token']['p99']:.3f} | {p['preemptions']} |"
                f" {moved * block_bytes / 1e9:.1f} | {sim['recomputes']} |"
            )
        lines.append(line)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastserve.bench.policy_table", description=__doc__)
    parser.add_argument("results", help="a simulate --json file")
    parser.add_argument("--rates", default="", help="comma list of loads to show per-run metrics at")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    rates = [float(r) for r in args.rates.split(",")] if args.rates else []
    print("\n".join(rows(results, rates)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
