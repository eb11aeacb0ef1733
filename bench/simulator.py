"""`fastserve simulate`: a discrete-event simulation running the live scheduler's own code.

The same policy objects (services/scheduler/policy) order the jobs and the same KV
planner (services/kvmanager/planner) hands out GPU blocks, swaps and recomputes;
only the model is replaced by the cost model. With pipeline parallelism k, k
batches of disjoint jobs are in flight, a new one starting every iteration/k.

Swap costs: a block moves over the host link in block_bytes / --host-bandwidth.
Swap-ins the batch needs sit on its critical path; proactive swap-outs and
prefetches overlap with compute (only the part longer than the iteration shows);
reactive swap-outs make room for the batch, so they are on its critical path too.
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from bench.report import summarize, throughput_at_slo
from bench.workloads import Trace, load_trace
from services.kvmanager.block_manager import BlockManager
from services.kvmanager.planner import SWAP_POLICIES, make_plan
from services.scheduler.enst import EnstEstimator
from services.scheduler.policy import (
    POLICIES,
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
)

OPT_13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2  # K and V, 40 layers, hidden 5120, fp16
PCIE4_X16 = 25e9  # bytes/s, effective


@dataclass
class SimConfig:
    policy: str = "skip-join-mlfq"
    limits: BatchLimits = field(default_factory=BatchLimits)
    num_gpu_blocks: int = 900  # OPT-13B on an A100-40GB: ~12 GB of KV at 819 kB a token
    num_host_blocks: int = 5000  # 64 GB of host memory
    block_size: int = 16
    kv_bytes_per_token: int = OPT_13B_KV_BYTES_PER_TOKEN
    host_bandwidth: float = PCIE4_X16
    swap_policy: str = "proactive"
    reserve_blocks: int = -1  # -1: 5% of the GPU pool
    pp: int = 1
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)


def simulate(trace: Trace, config: SimConfig, cost_model: CostModel, progress: bool = False) -> list[dict]:
    """Runs the trace; one record per request (times in seconds)."""
    policy_config = PolicyConfig(**{**config.policy_config.__dict__, "name": config.policy})
    if policy_config.base_quantum is None:
        policy_config.base_quantum = cost_model.decode_time(1)
    policy = make_policy(policy_config, cost_model)
    blocks = BlockManager(config.num_gpu_blocks, config.block_size, config.num_host_blocks)
    reserve = config.reserve_blocks if config.reserve_blocks >= 0 else -(-config.num_gpu_blocks // 20)
    enst = EnstEstimator(
        config.limits.max_batch_size,
        getattr(policy, "starvation_threshold", None),
        getattr(policy, "quantum", None),
    )
    block_seconds = config.block_size * config.kv_bytes_per_token / config.host_bandwidth

    records: dict[str, dict] = {}
    pending = sorted(trace)
    next_arrival = 0
    now = 0.0
    stage_free_at = 0.0  # when the first pipeline stage can take the next batch
    in_flight: list[tuple[float, int, float, list[Job]]] = []  # (finish time, seq, elapsed, batch)
    busy: set[str] = set()
    running: set[str] = set()
    seq = 0
    bar = tqdm(total=len(trace), desc=config.policy, unit="req", disable=not progress, file=sys.stderr)

    while next_arrival < len(pending) or policy.jobs:
        while next_arrival < len(pending) and pending[next_arrival][0] <= now:
            arrival, input_len, output_len = pending[next_arrival]
            rid = str(next_arrival)
            policy.add(Job(rid, input_len, output_len, arrival, output_len=output_len), arrival)
            records[rid] = {
                "arrival": arrival,
                "first_token": None,
                "finish": None,
                "output_tokens": output_len,
                "preemptions": 0,
                "demotions": 0,
            }
            next_arrival += 1

        started = False
        if len(in_flight) < config.pp and stage_free_at <= now:
            ordered = list(policy.order(now))
            batch = form_batch(ordered, config.limits, busy=busy)
            if batch:
                ids = {j.request_id for j in batch}
                waiting = [
                    (rid, e) for rid, e in enst(ordered, now).items() if rid not in ids and rid not in busy
                ]
                plan = make_plan(
                    blocks,
                    [(j.request_id, j.context_len) for j in batch],
                    waiting,
                    config.swap_policy,
                    reserve,
                )
                for rid in plan.recompute:
                    policy.jobs[rid].needs_prefill = True
                batch = [j for j in batch if j.request_id in plan.tables]
            if batch:
                for rid in running - {j.request_id for j in batch} - busy:
                    if rid in policy.jobs:
                        records[rid]["preemptions"] += 1
                running = {j.request_id for j in batch} | busy
                compute = cost_model.iteration_time(batch)
                on_path = len(plan.swap_in) * block_seconds
                background = (len(plan.swap_out) + len(plan.prefetch)) * block_seconds
                if config.swap_policy == "reactive":
                    on_path += len(plan.swap_out) * block_seconds
                    background = len(plan.prefetch) * block_seconds
                elapsed = on_path + max(compute, background)
                seq += 1
                heapq.heappush(in_flight, (now + elapsed, seq, elapsed, batch))
                busy |= {j.request_id for j in batch}
                stage_free_at = now + elapsed / config.pp
                started = True

        if started and len(in_flight) < config.pp:
            now = max(now, stage_free_at)
            continue
        if in_flight:
            now, _, elapsed, batch = heapq.heappop(in_flight)
            _complete(batch, now, elapsed, policy, blocks, records, busy)
            bar.update(sum(1 for j in batch if j.request_id not in policy.jobs))
            continue
        if next_arrival < len(pending):
            now = max(now, pending[next_arrival][0])
            continue
        break  # nothing runnable: jobs that can never get KV blocks
    bar.close()
    return [r for r in records.values() if r["finish"] is not None]


def _complete(
    batch: list[Job], now: float, elapsed: float, policy, blocks: BlockManager, records: dict, busy: set[str]
) -> None:
    for job in batch:
        busy.discard(job.request_id)
        job.num_generated += 1
        job.needs_prefill = False
        record = records[job.request_id]
        if record["first_token"] is None:
            record["first_token"] = now
        if job.num_generated >= job.output_len:
            record["finish"] = now
            record["demotions"] = job.demotions
            policy.remove(job.request_id)
            blocks.free(job.request_id)
    policy.on_iteration_done(batch, elapsed, now)


def run_point(trace: Trace, config: SimConfig, cost_model: CostModel, slo: float, progress: bool) -> dict:
    records = simulate(trace, config, cost_model, progress)
    return {
        "policy": config.policy,
        "swap_policy": config.swap_policy,
        **summarize(records, slo),
        "unfinished": len(trace) - len(records),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--policy", default="all", help=f"comma list of {', '.join(POLICIES)}, or all")
    parser.add_argument("--workload", default="sharegpt", help="sharegpt | alpaca | FILE.jsonl")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (without --sweep-rates)")
    parser.add_argument(
        "--sweep-rates", default="", help="comma list of rates; reports throughput at the SLO"
    )
    parser.add_argument("--cv", type=float, default=1.0, help="CV of Gamma arrivals (1 = Poisson)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--num-gpu-blocks", type=int, default=SimConfig.num_gpu_blocks)
    parser.add_argument("--num-host-blocks", type=int, default=SimConfig.num_host_blocks)
    parser.add_argument("--kv-bytes-per-token", type=int, default=OPT_13B_KV_BYTES_PER_TOKEN)
    parser.add_argument(
        "--host-bandwidth", type=float, default=PCIE4_X16, help="bytes/s of the GPU-host link"
    )
    parser.add_argument(
        "--swap-policy", default="proactive", help=f"comma list of {', '.join(SWAP_POLICIES)}"
    )
    parser.add_argument(
        "--cost-model", default="opt-13b-a100", help="preset, FILE.json or c0=..,c_prefill=.."
    )
    parser.add_argument("--base-quantum", type=float, default=0.0, help="seconds; 0 = one decode iteration")
    parser.add_argument("--quantum-ratio", type=float, default=2.0)
    parser.add_argument("--num-queues", type=int, default=16)
    parser.add_argument("--starvation-threshold", type=float, default=3.0)
    parser.add_argument("--starvation-period", type=int, default=1000)
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (batches in flight)")
    parser.add_argument("--slo", type=float, default=0.3, help="seconds per output token")
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument("--plot", default="", help="write a latency-vs-rate plot (PNG) here")
    parser.add_argument("--progress", action="store_true", help="a progress bar per run")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace, policy: str, swap_policy: str) -> SimConfig:
    return SimConfig(
        policy=policy,
        limits=BatchLimits(args.max_batch_size, args.max_num_batched_tokens),
        num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=args.num_host_blocks,
        kv_bytes_per_token=args.kv_bytes_per_token,
        host_bandwidth=args.host_bandwidth,
        swap_policy=swap_policy,
        pp=args.pp,
        policy_config=PolicyConfig(
            base_quantum=args.base_quantum or None,
            quantum_ratio=args.quantum_ratio,
            num_queues=args.num_queues,
            starvation_threshold=args.starvation_threshold,
            starvation_period=args.starvation_period,
        ),
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    swap_policies = args.swap_policy.split(",")
    for name in policies:
        if name not in POLICIES:
            raise SystemExit(f"--policy {name!r} is unknown; choose from {', '.join(POLICIES)}")
    rates = [float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else [args.rate]
    cost_model = CostModel.resolve(args.cost_model)
    results, summary = [], []
    print(
        f"{'policy':<16}{'swap':<11}{'rate':>7}{'mean lat/tok':>14}{'p95 lat/tok':>13}{'mean TTFT':>11}"
        f"{'mean JCT':>10}{'preempt':>9}"
    )
    for policy in policies:
        for swap_policy in swap_policies:
            points = []
            for rate in rates:
                trace = load_trace(args.workload, args.num_requests, rate, args.cv, args.seed)
                point = {
                    "rate": rate,
                    "workload": args.workload,
                    **run_point(
                        trace, config_from(args, policy, swap_policy), cost_model, args.slo, args.progress
                    ),
                }
                results.append(point)
                points.append(point)
                lat = point["latency_per_token"]
                print(
                    f"{policy:<16}{swap_policy:<11}{rate:>7.2f}{lat['mean']:>14.4f}{lat['p95']:>13.4f}"
                    f"{point['ttft']['mean']:>11.3f}{point['jct']['mean']:>10.2f}{point['preemptions']:>9}",
                    flush=True,
                )
            if len(rates) > 1:
                entry = {
                    "policy": policy,
                    "swap_policy": swap_policy,
                    "slo": args.slo,
                    "throughput_at_slo": {
                        stat: throughput_at_slo(
                            [(p["rate"], p["latency_per_token"][stat]) for p in points], args.slo
                        )
                        for stat in ("mean", "p95")
                    },
                }
                summary.append(entry)
                print(
                    f"  throughput at SLO {args.slo}s/token: mean {entry['throughput_at_slo']['mean']} req/s, "
                    f"p95 {entry['throughput_at_slo']['p95']} req/s"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "results": results,
                    "throughput": summary,
                    "cost_model": cost_model.to_dict(),
                    "args": vars(args),
                },
                f,
                indent=2,
            )
    if args.plot:
        from bench.plot import plot_latency_vs_rate

        plot_latency_vs_rate(results, args.slo, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
