"""Latency metrics of a run, shared by the simulator (`fastserve simulate`) and the live
load generator (`fastserve bench`), so both report the same numbers the same way.

A record is one request: a dict with `arrival`, `first_token`, `finish` (seconds, any
common origin), `output_tokens`, and optionally `preemptions`, `demotions`, `promotions`.

- JCT = finish - arrival; TTFT = first_token - arrival;
- latency per output token = (finish - arrival) / output_tokens (the paper's metric);
- TPOT = (finish - first_token) / (output_tokens - 1), for requests of 2+ tokens;
- throughput at the SLO = the request rate at which the mean (or P95) latency per
  output token crosses the SLO, linearly interpolated over a rate sweep.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100] (numpy's default method)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(values: list[float]) -> dict[str, float]:
    """mean, p50, p95, p99 (NaN when empty)."""
    mean = sum(values) / len(values) if values else math.nan
    return {
        "mean": mean,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


def summarize(records: list[dict], slo: float = 0.3) -> dict:
    """The metrics of one run (one policy at one rate): times in seconds.

    `slo_attainment` is the share of requests whose latency per output token is within `slo`.
    Latencies are those of the requests that did not fail (finish reason "error": a server error,
    or a connection that broke), as vLLM's benchmark counts them; `failed` says how many did.
    """
    served = [r for r in records if r.get("finish_reason") != "error"]
    jct = [r["finish"] - r["arrival"] for r in served]
    ttft = [r["first_token"] - r["arrival"] for r in served]
    per_token = [(r["finish"] - r["arrival"]) / max(r["output_tokens"], 1) for r in served]
    tpot = [
        (r["finish"] - r["first_token"]) / (r["output_tokens"] - 1) for r in served if r["output_tokens"] > 1
    ]
    itl = [gap for r in served for gap in r.get("itl", ())]
    duration = max(r["finish"] for r in records) - min(r["arrival"] for r in records) if records else math.nan
    output_tokens = sum(r["output_tokens"] for r in records)
    return {
        "num_requests": len(records),
        "completed": sum(r.get("finish_reason", "length") in ("length", "stop") for r in records),
        "failed": len(records) - len(served),
        "input_tokens": sum(r.get("input_len", 0) for r in records),
        "benchmark_duration": duration,
        "request_throughput": len(records) / duration if duration else math.nan,
        "output_throughput": output_tokens / duration if duration else math.nan,
        "itl": stats(itl),
        "jct": stats(jct),
        "ttft": stats(ttft),
        "latency_per_token": stats(per_token),
        "tpot": stats(tpot),
        "slo": slo,
        "slo_attainment": sum(x <= slo for x in per_token) / len(per_token) if per_token else math.nan,
        "preemptions": sum(r.get("preemptions", 0) for r in records),
        "demotions": sum(r.get("demotions", 0) for r in records),
        "promotions": sum(r.get("promotions", 0) for r in records),
        "output_tokens": output_tokens,
    }


def format_summary(result: dict) -> str:
    """A run's numbers as vLLM's serving benchmark prints them (times in ms), plus FastServe's own."""
    rows = [
        ("Successful requests", f"{result['completed']}"),
        *([("Failed requests", f"{result['failed']}")] if result.get("failed") else []),
        ("Benchmark duration (s)", f"{result['benchmark_duration']:.2f}"),
        ("Total input tokens", f"{result['input_tokens']}"),
        ("Total generated tokens", f"{result['output_tokens']}"),
        ("Request throughput (req/s)", f"{result['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{result['output_throughput']:.2f}"),
    ]
    lines = ["{:=^50}".format(" Serving Benchmark Result "), *(f"{k + ':':<40}{v:<10}" for k, v in rows)]
    for key, title, short in (
        ("ttft", "Time to First Token", "TTFT"),
        ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
        ("itl", "Inter-token Latency", "ITL"),
        ("jct", "End-to-end Latency", "E2EL"),
    ):
        lines.append(f"{title:-^50}")
        for stat, name in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99")):
            lines.append(f"{f'{name} {short} (ms):':<40}{result[key][stat] * 1e3:<10.2f}")
    lines.append("{:-^50}".format("FastServe"))
    lines.append(
        f"{'Mean latency per output token (ms):':<40}{result['latency_per_token']['mean'] * 1e3:<10.2f}"
    )
    slo = f"SLO attainment ({result['slo']:g} s/token):"
    lines.append(f"{slo:<40}{result['slo_attainment']:<10.2%}")
    for name in ("preemptions", "demotions", "promotions"):
        lines.append(f"{name.capitalize() + ':':<40}{result[name]:<10}")
    lines.append("=" * 50)
    return "\n".join(lines)


def slo_crossing(points: list[tuple[float, float]], slo: float) -> tuple[float | None, str]:
    """Where (rate, latency) points first cross `slo` going up in rate.

    Returns (rate, "crossed") with the rate linearly interpolated between the last point
    within the SLO and the first above it; (None, "always_above") when even the lowest
    rate misses it; (None, "never_crossed") when every rate meets it (the sweep stopped
    too low: the throughput is above the highest rate tried).
    """
    points = sorted(points)
    if not points:
        return None, "never_crossed"
    if points[0][1] > slo:
        return None, "always_above"
    for (r0, l0), (r1, l1) in zip(points, points[1:], strict=False):
        if l0 <= slo < l1:
            return r0 + (slo - l0) * (r1 - r0) / (l1 - l0), "crossed"
    return None, "never_crossed"


def throughput_at_slo(points: list[tuple[float, float]], slo: float) -> float | None:
    """The rate at which latency per token crosses `slo`; None if always above or never crossed."""
    return slo_crossing(points, slo)[0]


def sweep_throughput(results: list[dict], slo: float, key: str = "policy") -> dict[str, dict]:
    """Throughput at the SLO per `key` (e.g. policy) from per-(policy, rate) result objects.

    Each value: {"mean": rate | None, "p95": rate | None, "mean_status": .., "p95_status": ..,
    "min_rate" / "max_rate": lowest / highest rate tried}.
    """
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r[key], []).append(r)
    out = {}
    for name, points in groups.items():
        rates = [p["rate"] for p in points]
        entry: dict = {"min_rate": min(rates), "max_rate": max(rates)}
        for stat in ("mean", "p95"):
            rate, status = slo_crossing([(p["rate"], p["latency_per_token"][stat]) for p in points], slo)
            entry[stat], entry[f"{stat}_status"] = rate, status
        out[name] = entry
    return out


def format_throughput(entry: dict, stat: str = "mean") -> str:
    """'1.72', '>4' (never crossed up to the highest rate tried) or '<1' (above the SLO already at
    the lowest rate tried)."""
    if entry[stat] is not None:
        return f"{entry[stat]:.2f}"
    if entry[f"{stat}_status"] == "never_crossed":
        return f">{entry['max_rate']:g}"
    return f"<{entry['min_rate']:g}"


def throughput_table(tput: dict[str, dict]) -> list[str]:
    """Throughput at the SLO per group, one line each: name, mean, P95 (columns always apart)."""
    width = max([len("policy"), *map(len, tput)])
    lines = [f"{'policy':<{width}} {'mean':>9} {'p95':>9}"]
    for name, entry in tput.items():
        lines.append(
            f"{name:<{width}} {format_throughput(entry, 'mean'):>9} {format_throughput(entry, 'p95'):>9}"
        )
    return lines
