"""The scheduler's own cost, which the paper never measured.

1. Policy decision time per iteration (order + batch formation + accounting) at
   100, 1 000 and 10 000 queued jobs, for every policy.
2. With `--metrics`, the live control plane: the scheduler's Prometheus histograms
   of policy time, KV-manager Plan round trip and the worker's own compute time,
   read before and after a short load, next to the iteration time.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request

from bench.workloads import synthetic_lengths
from services.scheduler.policy import (
    POLICIES,
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
)


def make_jobs(queued: int, seed: int = 0) -> list[Job]:
    """`queued` ShareGPT-like jobs that outlive the measurement (so the count stays put)."""
    lengths = synthetic_lengths("sharegpt", queued, seed)
    return [
        Job(str(i), inp, 10**6, arrival_time=i * 1e-3, output_len=10**6 - (out % 997))
        for i, (inp, out) in enumerate(lengths)
    ]


def decision_time(
    policy_name: str,
    queued: int,
    iterations: int,
    seed: int = 0,
    warmup: int = 1000,
    materialize: bool = False,
) -> dict[str, float]:
    """Per-iteration policy cost with `queued` live jobs: order + form_batch + on_iteration_done.

    The clock advances by the cost model's time for each batch, so quanta run out,
    jobs spread over the queues and starvation checks (every 1000 iterations) find
    starved jobs, as in a long run; `warmup` iterations run first, untimed. With
    `materialize`, order() is copied whole with list() as the live engine does today
    for its swap estimates. Returns microseconds: mean, p50, p99, max, and the mean
    of each part.
    """
    cost = CostModel.resolve("opt-13b-a100")
    policy = make_policy(PolicyConfig(name=policy_name, base_quantum=cost.decode_time(1)), cost)
    jobs = make_jobs(queued, seed)
    for job in jobs:
        policy.add(job, job.arrival_time)
    limits = BatchLimits(16, 2048)
    now = queued * 1e-3
    clock = time.perf_counter_ns
    total, t_order, t_batch, t_done = [], 0, 0, 0
    for i in range(warmup + iterations):
        t0 = clock()
        ordered = policy.order(now)
        if materialize:
            ordered = list(ordered)
        t1 = clock()
        batch = form_batch(ordered, limits)
        t2 = clock()
        elapsed = cost.iteration_time(batch)  # not the policy's cost: outside the timed parts
        for job in batch:
            job.num_generated += 1
            job.needs_prefill = False
        now += elapsed
        t3 = clock()
        policy.on_iteration_done(batch, elapsed, now)
        t4 = clock()
        if i >= warmup:
            total.append((t1 - t0) + (t2 - t1) + (t4 - t3))
            t_order += t1 - t0
            t_batch += t2 - t1
            t_done += t4 - t3
    total.sort()
    n = len(total)
    return {
        "mean": sum(total) / n / 1e3,
        "p50": total[n // 2] / 1e3,
        "p99": total[min(n - 1, int(n * 0.99))] / 1e3,
        "max": total[-1] / 1e3,
        "order": t_order / n / 1e3,
        "form_batch": t_batch / n / 1e3,
        "on_iteration_done": t_done / n / 1e3,
        "iteration_ms": cost.decode_time(16, 16 * 500) * 1e3,
    }


def add_remove_time(policy_name: str, queued: int, seed: int = 0) -> float:
    """Mean microseconds to add then remove one job with `queued` live jobs."""
    cost = CostModel.resolve("opt-13b-a100")
    policy = make_policy(PolicyConfig(name=policy_name, base_quantum=cost.decode_time(1)), cost)
    for job in make_jobs(queued, seed):
        policy.add(job, job.arrival_time)
    extra = make_jobs(1000, seed + 1)
    for k, job in enumerate(extra):
        job.request_id = f"x{k}"
    started = time.perf_counter_ns()
    for job in extra:
        policy.add(job, queued * 1e-3)
    for job in extra:
        policy.remove(job.request_id)
    return (time.perf_counter_ns() - started) / len(extra) / 1e3


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    return {
        name: float(value)
        for name, _, value in (
            line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#")
        )
    }


def live_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean seconds per iteration of each part, from histogram _sum/_count deltas."""
    out = {}
    for key, metric in {
        "policy": "fastserve:policy_decision_seconds",
        "kv_plan": "fastserve:kv_plan_seconds",
        "worker_compute": "fastserve:worker_compute_seconds",
        "iteration": "fastserve:iteration_time_seconds",
    }.items():
        count = after.get(f"{metric}_count", 0) - before.get(f"{metric}_count", 0)
        total = after.get(f"{metric}_sum", 0) - before.get(f"{metric}_sum", 0)
        out[key] = total / count if count else float("nan")
    out["rpc_and_serialization"] = out["iteration"] - out["worker_compute"]
    out["control_plane"] = out["policy"] + out["kv_plan"] + out["rpc_and_serialization"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.overhead",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--queued", default="100,1000,10000", help="comma list of live job counts")
    parser.add_argument("--iterations", type=int, default=3000, help="timed iterations per run")
    parser.add_argument("--policy", default="all")
    parser.add_argument("--metrics", default="", help="scheduler metrics address (host:port) of a live stack")
    parser.add_argument(
        "--gateway", default="127.0.0.1:50051", help="gateway to load while reading --metrics"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    sizes = [int(n) for n in args.queued.split(",")]
    result: dict = {
        "iterations": args.iterations,
        "iteration_ms": CostModel.resolve("opt-13b-a100").decode_time(16, 16 * 500) * 1e3,
        "decision_us": {},
        "materialized_us": {},
        "add_remove_us": {},
    }
    print(
        "policy decision time per iteration (order + form_batch + on_iteration_done), microseconds;\n"
        "'list()' = order() copied whole first, as the live engine does for its swap estimates"
    )
    print(
        f"{'policy':<16}{'queued':>8}{'mean':>9}{'p50':>9}{'p99':>9}{'max':>10}"
        f"{'order':>8}{'batch':>8}{'done':>8}{'list() mean':>13}{'add+rm':>8}"
    )
    for name in policies:
        result["decision_us"][name], result["materialized_us"][name], result["add_remove_us"][name] = (
            {},
            {},
            {},
        )
        for n in sizes:
            lazy = decision_time(name, n, args.iterations)
            full = decision_time(name, n, args.iterations, materialize=True)
            churn = add_remove_time(name, n)
            result["decision_us"][name][n] = lazy
            result["materialized_us"][name][n] = full
            result["add_remove_us"][name][n] = churn
            print(
                f"{name:<16}{n:>8}{lazy['mean']:>9.1f}{lazy['p50']:>9.1f}{lazy['p99']:>9.1f}{lazy['max']:>10.1f}"
                f"{lazy['order']:>8.1f}{lazy['form_batch']:>8.1f}{lazy['on_iteration_done']:>8.1f}"
                f"{full['mean']:>13.1f}{churn:>8.1f}",
                flush=True,
            )
    print(
        f"(one decode iteration of OPT-13B on an A100, batch 16 at 500 tokens: {result['iteration_ms']:.1f} ms)"
    )
    if args.metrics:
        import asyncio

        from bench.load import replay

        before = scrape(args.metrics)
        trace = [(i * 0.05, 64, 32) for i in range(args.requests)]
        asyncio.run(replay(args.gateway, trace, 0, f"overhead-{int(time.time())}"))
        result["live_seconds"] = live_breakdown(before, scrape(args.metrics))
        for key, value in result["live_seconds"].items():
            print(f"live {key:<22} {value * 1e3:9.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
