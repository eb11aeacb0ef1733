"""`fastserve simulate`: a discrete-event simulation running the live scheduler's own code.

The same policy objects (services/scheduler/policy) order the jobs and form the
batches, and the same KV planner (services/kvmanager/planner) hands out GPU blocks,
swaps and recomputes; only the model is replaced by the cost model, which says how
long each iteration takes. Time jumps from event to event: an arrival, the end of
an iteration, the first pipeline stage freeing up.

Pipeline parallelism k (--pp): k batches of disjoint jobs are in flight; each stage
takes iteration_time / k, so a new batch may start every iteration_time / k and a
batch's tokens come out iteration_time after it started.

KV: --num-gpu-blocks blocks of 16 tokens (default: OPT-13B on an A100-40GB, see
below); --num-host-blocks more on the host. Swap policies (--swap-policy):
- proactive | reactive | recompute: the KV manager's planner (DESIGN §4). A block
  moves over the host link in block_bytes / --host-bandwidth seconds. Swap-ins the
  batch needs sit on its critical path; proactive swap-outs and prefetches overlap
  with compute (only the part longer than the iteration shows); reactive swap-outs
  make room for the batch, so they are on its critical path too.
- none: no host tier and no eviction: a job that cannot get its KV blocks waits
  (form_batch's KV budget); only if nothing at all can run is the lowest-priority
  holder's KV dropped for recompute, so the run cannot deadlock.

Default KV capacity, the artifact's settings (--gpu-memory-utilization 0.9, --swap-space 32):
GPU: (0.9 * 40 GiB - 26 GB of OPT-13B weights) / (819 200 B of KV per token = 2 (K, V)
* 40 layers * 5120 hidden * 2 B) = 15 441 tokens = 965 blocks of 16; host: 32 GiB =
2621 blocks of 13.1 MB.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from fastserve.bench.report import summarize, sweep_throughput, throughput_table
from fastserve.bench.workloads import Trace, load_trace, noisy_predictions
from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.planner import SWAP_POLICIES, make_plan
from fastserve.services.scheduler.core import CoreConfig, KVPlan, Proposal, SchedulerCore, Step
from fastserve.services.scheduler.policy import (
    MLFQ,
    POLICIES,
    BatchLimits,
    CostModel,
    PolicyConfig,
    make_policy,
    needs_prediction,
    swap_policy_of,
)
from fastserve.services.scheduler.policy.predicted import DEFAULT_SIGMA

OPT_13B_KV_BYTES_PER_TOKEN = 2 * 40 * 5120 * 2  # K and V, 40 layers, hidden 5120, fp16
GIB = 2**30
A100_40GB_KV_BYTES = 0.9 * 40 * GIB - 26e9  # the artifact's 90% of the GPU, less OPT-13B's fp16 weights
BLOCK_SIZE = 16
BLOCK_BYTES = OPT_13B_KV_BYTES_PER_TOKEN * BLOCK_SIZE
OPT_13B_A100_BLOCKS = int(A100_40GB_KV_BYTES // BLOCK_BYTES)  # 965
HOST_BLOCKS = int(32 * GIB // BLOCK_BYTES)  # the artifact's --swap-space 32 (GiB): 2621
PCIE4_X16 = 25e9  # bytes/s, effective
SIM_SWAP_POLICIES = (*SWAP_POLICIES, "none")


@dataclass
class SimConfig:
    policy: str = "skip-join-mlfq"
    limits: BatchLimits = field(default_factory=BatchLimits)
    num_gpu_blocks: int = OPT_13B_A100_BLOCKS
    num_host_blocks: int = HOST_BLOCKS
    block_size: int = BLOCK_SIZE
    kv_bytes_per_token: int = OPT_13B_KV_BYTES_PER_TOKEN
    host_bandwidth: float = PCIE4_X16
    swap_policy: str = "proactive"  # or reactive, recompute, none
    reserve_blocks: int = -1  # -1: the core's default (5% of the GPU pool)
    pp: int = 1
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)


def simulate(
    trace: Trace,
    config: SimConfig,
    cost_model: CostModel,
    progress: bool = False,
    stats: dict | None = None,
) -> list[dict]:
    """Runs the trace of (arrival, input_len, output_len[, predicted_len]); one record per finished request.

    Records carry `arrival`, `first_token`, `finish` (seconds), `output_tokens`,
    `preemptions`, `demotions`, `promotions` (fastserve.bench.report.summarize reads them). When
    `stats` is given it receives run totals: iterations, mean batch size, swapped
    blocks, recomputes, the simulated makespan.
    """
    if config.swap_policy not in SIM_SWAP_POLICIES:
        raise ValueError(f"--swap-policy {config.swap_policy!r} is not one of {SIM_SWAP_POLICIES}")
    if config.pp < 1:
        raise ValueError(f"--pp must be >= 1, got {config.pp}")
    policy = make_policy(PolicyConfig(**{**config.policy_config.__dict__, "name": config.policy}), cost_model)
    core_config = CoreConfig(
        num_gpu_blocks=config.num_gpu_blocks,
        num_host_blocks=config.num_host_blocks,
        limits=config.limits,
        block_size=config.block_size,
        swap_policy=config.swap_policy,
        reserve_blocks=config.reserve_blocks,
        pp_size=config.pp,
    )
    core = SchedulerCore(core_config, policy)
    bs = config.block_size
    blocks = BlockManager(config.num_gpu_blocks, bs, core_config.host_blocks)
    block_seconds = bs * config.kv_bytes_per_token / config.host_bandwidth
    totals = dict.fromkeys(
        ("iterations", "batched_jobs", "swap_in_blocks", "swap_out_blocks", "prefetch_blocks", "recomputes"),
        0,
    )
    totals["swap_seconds_on_path"] = 0.0

    records: dict[str, dict] = {}
    pending = sorted(trace)
    next_arrival = 0
    now = 0.0
    stage_free_at = 0.0  # when the first pipeline stage can take the next batch
    in_flight: list[tuple[float, int, float, Step]] = []  # (finish time, seq, elapsed, step)
    bar = tqdm(
        total=len(pending),
        desc=config.policy,
        unit="req",
        disable=None if progress else True,
        file=sys.stderr,
    )

    def admit() -> None:
        nonlocal next_arrival
        while next_arrival < len(pending) and pending[next_arrival][0] <= now:
            arrival, input_len, output_len, *predicted = pending[next_arrival]
            rid = str(next_arrival)
            core.add(
                rid,
                [0] * input_len,
                output_len,
                arrival,
                output_len=output_len,
                predicted_len=predicted[0] if predicted else None,
            )
            records[rid] = {
                "arrival": arrival,
                "first_token": None,
                "finish": None,
                "output_tokens": output_len,
                "preemptions": 0,
                "demotions": 0,
                "promotions": 0,
            }
            next_arrival += 1

    def record_events() -> None:
        if frees := core.take_frees():
            for rid in frees:
                blocks.free(rid)
            core.observe_free(blocks.num_free, blocks.num_host_free)
        for event in core.take_events():
            record = records[event.seq.request_id]
            if event.kind == "token" and event.first:
                record["first_token"] = now
            elif event.kind == "preempted":
                record["preemptions"] += 1
            elif event.kind == "finished":
                job = event.seq.job
                record.update(finish=now, demotions=job.demotions, promotions=job.promotions)
                bar.update()

    def plan_for(proposal: Proposal) -> tuple[KVPlan | None, float, float]:
        """The KV manager's part, in-process: the plan, swap seconds on the critical path and in the background."""
        if not proposal.plan:
            return None, 0.0, 0.0
        if config.swap_policy == "none":  # the batch fits the free GPU blocks (form_batch's budget)
            tables = {rid: blocks.allocate(rid, n) for rid, n in proposal.demands}
            return KVPlan(tables=tables, free_gpu_blocks=blocks.num_free), 0.0, 0.0  # type: ignore[arg-type]
        plan = make_plan(blocks, proposal.demands, proposal.waiting, config.swap_policy, core_config.reserve)
        totals["recomputes"] += len(plan.recompute)
        totals["swap_in_blocks"] += len(plan.swap_in)
        totals["swap_out_blocks"] += len(plan.swap_out)
        totals["prefetch_blocks"] += len(plan.prefetch)
        on_path = len(plan.swap_in) * block_seconds
        background = (len(plan.swap_out) + len(plan.prefetch)) * block_seconds
        if config.swap_policy == "reactive":
            on_path += len(plan.swap_out) * block_seconds
            background = len(plan.prefetch) * block_seconds
        told = KVPlan(
            plan.tables,
            plan.swapped_in,
            plan.swapped_out,
            plan.recompute,
            blocks.num_free,
            blocks.num_host_free,
        )
        return told, on_path, background

    def start() -> bool:
        nonlocal stage_free_at
        proposal = core.schedule(now)
        while proposal is None and config.swap_policy == "none":
            # nothing fits and nothing runs: drop the lowest-priority holder's KV (recompute later)
            victim = core.drop_victim(now)
            if victim is None:
                break
            blocks.free(victim)
            totals["recomputes"] += 1
            proposal = core.schedule(now)
        if proposal is None:
            return False
        plan, on_path, background = plan_for(proposal)
        step = core.launch(proposal, plan, now)
        record_events()
        if step is None:
            return False
        elapsed = on_path + max(
            cost_model.time(step.prefill_tokens, step.decode_seqs, step.context_tokens), background
        )
        totals["swap_seconds_on_path"] += on_path
        totals["iterations"] += 1
        totals["batched_jobs"] += len(step.inputs)
        heapq.heappush(in_flight, (now + elapsed, step.id, elapsed, step))
        stage_free_at = now + elapsed / config.pp
        return True

    while True:
        admit()
        while in_flight and in_flight[0][0] <= now:
            _, _, elapsed, step = heapq.heappop(in_flight)
            core.complete(step, [0] * len(step.inputs), elapsed, now)
            record_events()
        if len(in_flight) < config.pp and stage_free_at <= now and core.seqs:
            start()
        wake = []
        if next_arrival < len(pending):
            wake.append(pending[next_arrival][0])
        if in_flight:
            wake.append(in_flight[0][0])
        if len(in_flight) < config.pp and stage_free_at > now:
            wake.append(stage_free_at)
        if not wake:
            break  # done, or jobs left that can never get their KV blocks
        now = max(now, min(wake))
    bar.close()
    if stats is not None:
        stats.update(totals)
        stats["mean_batch_size"] = totals["batched_jobs"] / max(totals["iterations"], 1)
        stats["makespan"] = now
    return [r for r in records.values() if r["finish"] is not None]


def run_point(
    trace: Trace,
    config: SimConfig,
    cost_model: CostModel,
    slo: float = 0.3,
    progress: bool = False,
    records: list[dict] | None = None,
) -> dict:
    """One (policy, load) point: the metrics of fastserve.bench.report.summarize plus run totals; `records`,
    when given, receives the per-request records (in the order of the sorted trace)."""
    stats: dict = {}
    finished = simulate(trace, config, cost_model, progress, stats)
    if records is not None:
        records.extend(finished)
    return {
        "policy": config.policy,
        "swap_policy": config.swap_policy,
        **summarize(finished, slo),
        "submitted": len(trace),
        "unfinished": len(trace) - len(finished),
        "sim": stats,
    }


def _run_task(task: tuple) -> dict:
    workload, num_requests, rate, cv, seed, config, cost_model, slo, progress, tokenizer, dataset, noise = (
        task
    )
    trace = load_trace(workload, num_requests, rate, cv, seed, tokenizer, dataset)
    if noise >= 0:
        trace = noisy_predictions(trace, noise, seed)
    elif needs_prediction(config.policy) and any(len(row) < 4 for row in trace):
        raise SystemExit(
            f"--policy {config.policy} needs predicted lengths: --workload {workload} has none "
            "(use a trace with predicted_len, e.g. sharegpt-real-test, or --prediction-noise)"
        )
    point = run_point(trace, config, cost_model, slo, progress)
    return {"workload": workload, "rate": rate, "cv": cv, "seed": seed, "prediction_noise": noise, **point}


def run_points(tasks: list[tuple], jobs: int, desc: str = "simulate") -> list[dict]:
    """Runs _run_task over `tasks` on `jobs` processes (in order), with a progress bar over runs."""
    bar = tqdm(
        total=len(tasks), desc=desc, unit="run", disable=None if len(tasks) > 1 else True, file=sys.stderr
    )
    results = []
    if jobs > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(jobs, len(tasks))) as pool:
            for result in pool.map(_run_task, tasks):
                results.append(result)
                bar.update()
    else:
        for task in tasks:
            results.append(_run_task(task))
            bar.update()
    bar.close()
    return results


def split_names(values: list[str] | None, known, flag: str, default: list[str], everything=None) -> list[str]:
    """Repeatable, comma-separated names; 'all' expands to `everything` (default: every known name)."""
    names: list[str] = []
    for value in values or default:
        for name in filter(None, (v.strip() for v in value.split(","))):
            expanded = list(known if everything is None else everything) if name == "all" else [name]
            for n in expanded:
                if n not in known:
                    raise SystemExit(f"{flag} {n!r} is unknown; choose from {', '.join(known)} or all")
                if n not in names:
                    names.append(n)
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve simulate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--policy",
        action="append",
        help=f"repeatable or comma list of {', '.join(POLICIES)}, or all (default: every policy "
        "that needs no predicted lengths)",
    )
    parser.add_argument(
        "--workload", default="sharegpt", help="sharegpt | alpaca | sharegpt-real | FILE.jsonl"
    )
    parser.add_argument(
        "--tokenizer",
        default="sharegpt-bpe",
        help="sharegpt-real: sharegpt-bpe | byte | whitespace | HF tokenizer dir (bench/sharegpt.py)",
    )
    parser.add_argument(
        "--dataset", default="", help="sharegpt-real: the ShareGPT JSON (default: the package's)"
    )
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second (without --sweep-rates)")
    parser.add_argument(
        "--sweep-rates", default="", help="comma list of rates; reports throughput at the SLO"
    )
    parser.add_argument("--cv", type=float, default=1.0, help="CV of Gamma inter-arrival times (1 = Poisson)")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="seconds of arrivals per run: a run has min(--num-requests, rate x duration) requests "
        "(the artifact's sweeps: --duration 200 --num-requests 400); 0 = always --num-requests",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument(
        "--enable-chunked-prefill",
        action="store_true",
        help="split prefills that do not fit the token budget into chunks (as the scheduler's flag)",
    )
    parser.add_argument(
        "--num-gpu-blocks",
        type=int,
        default=OPT_13B_A100_BLOCKS,
        help="KV blocks on the GPU (OPT-13B, A100-40GB)",
    )
    parser.add_argument("--num-host-blocks", type=int, default=SimConfig.num_host_blocks)
    parser.add_argument("--block-size", type=int, default=BLOCK_SIZE)
    parser.add_argument("--kv-bytes-per-token", type=int, default=OPT_13B_KV_BYTES_PER_TOKEN)
    parser.add_argument(
        "--host-bandwidth", type=float, default=PCIE4_X16, help="bytes/s of the GPU-host link"
    )
    parser.add_argument(
        "--swap-policy", action="append", help=f"repeatable or comma list of {', '.join(SIM_SWAP_POLICIES)}"
    )
    parser.add_argument(
        "--cost-model", default="opt-13b-a100", help="preset, FILE.json or c0=..,c_prefill=.."
    )
    parser.add_argument("--base-quantum", type=float, default=0.0, help="seconds; 0 = one decode iteration")
    parser.add_argument("--quantum-ratio", type=float, default=2.0)
    parser.add_argument("--num-queues", type=int, default=16)
    parser.add_argument(
        "--starvation-threshold",
        type=float,
        default=PolicyConfig.starvation_threshold,
        help="α, seconds (the artifact used 3)",
    )
    parser.add_argument("--starvation-period", type=int, default=1000, help="iterations between checks")
    parser.add_argument("--pp", type=int, default=1, help="pipeline stages (batches in flight)")
    parser.add_argument(
        "--prediction-noise",
        type=float,
        default=-1.0,
        help="predicted-* policies: predictions = true length x exp(N(0, this)) (a noisy oracle; "
        "replaces the trace's own); < 0: the trace's predicted_len",
    )
    parser.add_argument(
        "--prediction-sigma",
        type=float,
        default=-1.0,
        help="the log-error spread predicted-gittins assumes; < 0: --prediction-noise when given, "
        f"else {DEFAULT_SIGMA}",
    )
    parser.add_argument("--slo", type=float, default=0.3, help="seconds per output token")
    parser.add_argument("--json", default="", help="write the results here (a list of objects)")
    parser.add_argument("--plot", default="", help="write a latency-vs-rate plot (PNG) here")
    parser.add_argument("--progress", action="store_true", help="a per-request progress bar per run")
    parser.add_argument("--jobs", type=int, default=1, help="simulate this many runs in parallel processes")
    args = parser.parse_args(argv)
    # `all`: the policies that need no prediction; predicted-* are named (they need predictions)
    blind = [p for p in POLICIES if not needs_prediction(p)]
    args.policy = split_names(args.policy, POLICIES, "--policy", ["all"], blind)
    args.swap_policy = split_names(args.swap_policy, SIM_SWAP_POLICIES, "--swap-policy", ["proactive"])
    return args


def config_from(args: argparse.Namespace, policy: str, swap_policy: str) -> SimConfig:
    return SimConfig(
        policy=policy,
        limits=BatchLimits(args.max_batch_size, args.max_num_batched_tokens, args.enable_chunked_prefill),
        num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=args.num_host_blocks,
        block_size=args.block_size,
        kv_bytes_per_token=args.kv_bytes_per_token,
        host_bandwidth=args.host_bandwidth,
        swap_policy=swap_policy_of(policy, swap_policy),
        pp=args.pp,
        policy_config=PolicyConfig(
            base_quantum=args.base_quantum or None,
            quantum_ratio=args.quantum_ratio,
            num_queues=args.num_queues,
            starvation_threshold=args.starvation_threshold,
            starvation_period=args.starvation_period,
            extra={"prediction_sigma": prediction_sigma(args)},
        ),
    )


def prediction_sigma(args: argparse.Namespace) -> float:
    if args.prediction_sigma >= 0:
        return args.prediction_sigma
    return args.prediction_noise if args.prediction_noise >= 0 else DEFAULT_SIGMA


HEADER = (
    f"{'policy':<18}{'swap':<10}{'rate':>7}{'lat/tok mean':>13}{'p95':>8}{'p99':>8}"
    f"{'TTFT mean':>10}{'p95':>8}{'JCT mean':>9}{'preempt':>9}{'demote':>8}{'batch':>6}{'unfin':>6}"
)


def format_row(p: dict) -> str:
    lat, ttft = p["latency_per_token"], p["ttft"]
    return (
        f"{p['policy']:<18}{p['swap_policy']:<10}{p['rate']:>7.2f}{lat['mean']:>13.4f}{lat['p95']:>8.3f}"
        f"{lat['p99']:>8.3f}{ttft['mean']:>10.3f}{ttft['p95']:>8.2f}{p['jct']['mean']:>9.1f}"
        f"{p['preemptions']:>9}{p['demotions']:>8}{p['sim']['mean_batch_size']:>6.1f}{p['unfinished']:>6}"
    )


def requests_at(rate: float, num_requests: int, duration: float) -> int:
    """Requests in a run at `rate`: all of them, or as many as arrive in `duration` seconds if fewer."""
    return num_requests if duration <= 0 else max(1, min(num_requests, round(rate * duration)))


def main(argv: list[str] | None = None) -> int:
    """`fastserve simulate`: prints a table; --json writes one object per (policy, swap policy, rate)."""
    args = parse_args(argv)
    rates = [float(r) for r in args.sweep_rates.split(",")] if args.sweep_rates else [args.rate]
    cost_model = CostModel.resolve(args.cost_model)
    base = MLFQ(PolicyConfig(base_quantum=args.base_quantum or None), cost_model).base
    print(
        f"workload {args.workload}, {args.num_requests} requests"
        f"{f' (at most {args.duration:g} s of arrivals)' if args.duration > 0 else ''}, CV {args.cv}, seed {args.seed}; cost model "
        f"{args.cost_model} { ({k: float(f'{v:.4g}') for k, v in cost_model.to_dict().items()}) }; "
        f"batch {args.max_batch_size}/{args.max_num_batched_tokens} tokens, {args.num_gpu_blocks} GPU blocks, "
        f"pp {args.pp}; quanta {base * 1e3:.1f} ms x {args.quantum_ratio}^i over {args.num_queues} queues, "
        f"α {args.starvation_threshold}s every {args.starvation_period} iterations"
    )
    groups = [(policy, swap) for policy in args.policy for swap in args.swap_policy]
    # a bar over runs for sweeps; a per-request bar for a single long run (both on a terminal only)
    progress = args.progress or (len(groups) * len(rates) == 1 and args.num_requests >= 2000)
    tasks = [
        (
            args.workload,
            requests_at(rate, args.num_requests, args.duration),
            rate,
            args.cv,
            args.seed,
            config_from(args, policy, swap),
            cost_model,
            args.slo,
            progress,
            args.tokenizer,
            args.dataset,
            args.prediction_noise,
        )
        for policy, swap in groups
        for rate in rates
    ]
    results = run_points(tasks, args.jobs if args.jobs > 0 else os.cpu_count() or 1)
    print(HEADER)
    for point in results:
        print(format_row(point))
    for point, task in zip(results, tasks, strict=True):
        point["config"] = {
            **asdict(task[5]),
            "cost_model": cost_model.to_dict(),
            "cost_model_spec": args.cost_model,
        }
    if len(rates) > 1:
        for r in results:
            r["group"] = r["policy"] if len(args.swap_policy) == 1 else f"{r['policy']}/{r['swap_policy']}"
        tput = sweep_throughput(results, args.slo, key="group")
        print(f"\nthroughput at SLO {args.slo} s/token (req/s, interpolated over rates {args.sweep_rates}):")
        print("\n".join(throughput_table(tput)))
        for r in results:
            r["throughput_at_slo"] = tput[r["group"]]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    if args.plot:
        from fastserve.bench.plot import plot_latency_vs_rate

        plot_latency_vs_rate(results, args.slo, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
