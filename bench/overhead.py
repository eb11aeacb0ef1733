"""The scheduler's own cost, which the paper never measured.

1. Policy decision time per iteration (order + batch formation + accounting) at
   100, 1 000 and 10 000 queued jobs, for every policy.
2. With `--address`, the live control plane: the scheduler's Prometheus histograms
   of policy time, KV-manager Plan round trip and the worker's own compute time,
   read before and after a short load, next to the iteration time.
"""

from __future__ import annotations

import argparse
import json
import random
import time
import urllib.request

from services.scheduler.policy import (
    POLICIES,
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
)


def decision_time(policy_name: str, queued: int, iterations: int, seed: int = 0) -> float:
    """Mean seconds per iteration of order + form_batch + on_iteration_done with `queued` live jobs."""
    rng = random.Random(seed)
    cost = CostModel.resolve("opt-13b-a100")
    policy = make_policy(PolicyConfig(name=policy_name, base_quantum=cost.decode_time(1)), cost)
    for i in range(queued):
        job = Job(
            str(i),
            rng.randint(4, 1024),
            rng.randint(4, 1024),
            arrival_time=i * 1e-3,
            output_len=rng.randint(4, 1024),
        )
        policy.add(job, job.arrival_time)
    limits = BatchLimits(16, 2048)
    now = queued * 1e-3
    started = time.perf_counter()
    for _ in range(iterations):
        batch = form_batch(policy.order(now), limits)
        for job in batch:
            job.num_generated += 1
            job.needs_prefill = False
        now += 0.03
        policy.on_iteration_done(batch, 0.03, now)
    return (time.perf_counter() - started) / iterations


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
    )
    parser.add_argument("--queued", default="100,1000,10000", help="comma list of live job counts")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--policy", default="all")
    parser.add_argument("--metrics", default="", help="scheduler metrics address (host:port) of a live stack")
    parser.add_argument(
        "--gateway", default="127.0.0.1:50051", help="gateway to load while reading --metrics"
    )
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    result: dict = {"decision_us": {}}
    print(f"{'policy':<16}" + "".join(f"{n:>12}" for n in args.queued.split(",")) + "   (µs per iteration)")
    for name in policies:
        row = {int(n): decision_time(name, int(n), args.iterations) * 1e6 for n in args.queued.split(",")}
        result["decision_us"][name] = row
        print(f"{name:<16}" + "".join(f"{v:>12.1f}" for v in row.values()))
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
