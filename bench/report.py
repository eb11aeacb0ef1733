"""Latency metrics of a run, shared by the simulator and the live load generator.

Records are dicts with `arrival`, `first_token`, `finish` (seconds), `output_tokens`
and `preemptions`. Latency per output token = (finish - arrival) / output tokens.
"""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values) if values else math.nan
    return {
        "mean": mean,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
    }


def summarize(records: list[dict], slo: float = 0.3) -> dict:
    jct = [r["finish"] - r["arrival"] for r in records]
    ttft = [r["first_token"] - r["arrival"] for r in records]
    per_token = [(r["finish"] - r["arrival"]) / max(r["output_tokens"], 1) for r in records]
    return {
        "num_requests": len(records),
        "jct": stats(jct),
        "ttft": stats(ttft),
        "latency_per_token": stats(per_token),
        "slo_attainment": sum(x <= slo for x in per_token) / len(per_token) if per_token else math.nan,
        "preemptions": sum(r.get("preemptions", 0) for r in records),
        "demotions": sum(r.get("demotions", 0) for r in records),
        "output_tokens": sum(r["output_tokens"] for r in records),
    }


def throughput_at_slo(points: list[tuple[float, float]], slo: float) -> float | None:
    """The rate at which latency per token crosses `slo`, interpolated over (rate, latency) points.

    None when no point is under the SLO; the highest rate when none is over it (a lower bound).
    """
    points = sorted(points)
    if not points or points[0][1] > slo:
        return None
    for (r0, l0), (r1, l1) in zip(points, points[1:], strict=False):
        if l0 <= slo < l1:
            return r0 + (slo - l0) * (r1 - r0) / (l1 - l0)
    return points[-1][0]
