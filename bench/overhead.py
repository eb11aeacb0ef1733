"""The scheduler's own cost, which the paper never measured.

1. The whole per-iteration CPU path of the live `Engine` (scheduling core, KV plan
   requests when needed, step messages, events to streams, metrics and Redis records)
   at 100, 1 000 and 10 000 queued jobs, every one holding KV blocks: the Engine runs
   its real loop against an instant in-process worker group and the KV manager's own
   service object on an in-process plan stream, on a clock that advances by the OPT-13B
   cost model's time for each step (so quanta, demotions and starvation behave as on
   an A100). The KV manager's planning is timed apart (in a deployment it is another process).
2. Policy decision time per iteration alone (order + batch formation + accounting).
3. With `--metrics`, the live control plane: the scheduler's Prometheus histograms
   of policy time, KV-manager Plan round trip and the worker's own compute time,
   read before and after a short load, next to the iteration time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import urllib.request
from dataclasses import replace

from fastserve.bench.workloads import synthetic_lengths
from fastserve.embedded_redis import start_redis
from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.server import KVManagerService
from fastserve.services.scheduler.core import CoreConfig, SchedulerCore
from fastserve.services.scheduler.engine import Engine
from fastserve.services.scheduler.policy import (
    POLICIES,
    BatchLimits,
    CostModel,
    Job,
    PolicyConfig,
    form_batch,
    make_policy,
)
from fastserve.store import JobLog, RequestStore
from fastserve.v1 import common_pb2, scheduler_pb2, worker_pb2


def make_jobs(queued: int, seed: int = 0) -> list[Job]:
    """`queued` ShareGPT-like jobs that outlive the measurement (so the count stays put)."""
    lengths = synthetic_lengths("sharegpt", queued, seed)
    return [
        Job(str(i), inp, 10**6, arrival_time=i * 1e-3, output_len=10**6 - (out % 997), predicted_len=out)
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


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class _InProcessKV:
    """The KV manager's service object behind an in-process Plan stream; times its own planning."""

    def __init__(self, config: CoreConfig) -> None:
        self.service = KVManagerService()
        self.service.blocks = BlockManager(config.num_gpu_blocks, config.block_size, config.host_blocks)
        self.service.swap_policy, self.service.reserve = config.swap_policy, config.reserve
        self.seconds = 0.0
        self.plans = 0

    def Plan(self) -> _InProcessKV:  # noqa: N802 (the stub's name)
        self.replies: asyncio.Queue = asyncio.Queue()
        return self

    async def write(self, request) -> None:
        started = time.process_time()
        self.replies.put_nowait(self.service._answer(request))
        self.seconds += time.process_time() - started
        self.plans += bool(request.batch)

    def __aiter__(self) -> _InProcessKV:
        return self

    async def __anext__(self):
        return await self.replies.get()


class _InstantWorkers:
    """Answers every step at once and moves the clock by what the step would take on the GPU.

    Once `warm` (every job has run and holds KV), each step it answers is a mark: the CPU
    time since the previous mark is one iteration of the Engine's loop (`marks`)."""

    def __init__(self, cost: CostModel, clock: _Clock, queued: int, kv: _InProcessKV) -> None:
        self.cost, self.clock, self.queued, self.kv = cost, clock, queued, kv
        self.seen: set[str] = set()
        self.after = 0  # steps since every job had run
        self.warm = asyncio.Event()  # every job has run (holds KV)
        self.target = 0
        self.done = asyncio.Event()
        self.broken = None  # never goes down
        self.seconds = 0.0  # CPU of this stand-in (a worker is another process): not the Engine's
        # at each step: (CPU, CPU of the stand-ins for other processes, wall, KV planning CPU)
        self.marks: list[tuple[float, float, float, float]] = []
        self.store: JobLog | None = None  # with a real job log: each step waits until it has flushed

    async def step(self, request: worker_pb2.StepRequest) -> worker_pb2.StepResponse:
        started = time.process_time()  # this stand-in's own CPU is the worker's, not the Engine's
        prefill = decode = context = 0
        for s in request.seqs:
            fed = len(s.token_ids)
            context += s.start_pos + max(fed, 1)
            if fed > 1:
                prefill += s.start_pos + fed
            else:
                decode += 1
        if not self.warm.is_set():
            # warm once every job has run and the step that prefilled them all has been completed
            # (the step after it went out before its tokens were back: the one after that)
            if len(self.seen) == self.queued:
                self.after += 1
                if self.after == 2:
                    self.warm.set()
            self.seen.update(s.request_id for s in request.seqs)
        elif self.target and not self.done.is_set():
            kv = self.kv.seconds
            self.marks.append((time.process_time(), kv + self.seconds, time.perf_counter(), kv))
            if len(self.marks) == self.target + 1:
                self.done.set()
        self.clock.now += self.cost.time(prefill, decode, context)
        reply = worker_pb2.StepResponse(step_id=request.step_id, token_ids=[5] * len(request.seqs))
        self.seconds += time.process_time() - started
        if self.store is not None:  # one Redis flush per iteration, as on a GPU (never coalesced)
            await self.store.flushed(timeout=60)
        await asyncio.sleep(0)
        return reply


class _NullStore:
    def update(self, request_id: str, fields, tokens=None) -> None:
        pass


async def _engine_run(
    policy_name: str, queued: int, iterations: int, seed: int, redis_url: str
) -> dict[str, float]:
    cost = CostModel.resolve("opt-13b-a100")
    lengths = synthetic_lengths("sharegpt", queued, seed)
    # room for every job's prompt and the tokens it generates while timed, plus the proactive reserve
    blocks = sum(-(-(inp + iterations) // 16) for inp, _ in lengths) * 21 // 20 + 64
    config = CoreConfig(num_gpu_blocks=blocks, limits=BatchLimits(16, 2048), overlap=True, eos_token_id=2)
    policy = make_policy(PolicyConfig(name=policy_name, base_quantum=cost.decode_time(1)), cost)
    clock = _Clock()
    kv = _InProcessKV(config)
    workers = _InstantWorkers(cost, clock, queued, kv)
    store = JobLog(RequestStore(redis_url, ttl_seconds=600)) if redis_url else _NullStore()
    engine = Engine(SchedulerCore(config, policy), workers, kv, store, cost, 1, clock=clock)  # type: ignore[arg-type]
    sampling = common_pb2.ResolvedSampling(max_tokens=10**6, top_p=1.0, repetition_penalty=1.0)
    for i, (inp, _) in enumerate(lengths):
        engine.submit(
            scheduler_pb2.SubmitRequest(request_id=str(i), prompt_token_ids=[1] * inp, sampling=sampling)
        )
    # warm-up: one step prefills every job (a batch without limits), then the real limits apply
    engine.core.config = replace(config, limits=BatchLimits(queued, 10**9))
    loop = asyncio.create_task(engine.run())
    await workers.warm.wait()
    engine.core.config = config
    holding = sum(seq.holds_kv for seq in engine.core.seqs.values())
    if isinstance(store, JobLog):  # the warm-up's records are written before the timed steps
        workers.store = store
        store.start()
        await store.flushed(timeout=300)
    # the steps launched before the limits applied are still in flight: they complete untimed
    skip = config.slots + 1
    workers.target = skip + iterations
    plans = kv.plans
    await workers.done.wait()
    plans = kv.plans - plans
    loop.cancel()
    try:
        await loop
    except asyncio.CancelledError:
        pass
    if isinstance(store, JobLog):
        await store.stop()
        await store.store.close()
    marks = workers.marks[skip:]
    per_step = sorted(
        (cpu1 - cpu0) - (other1 - other0)
        for (cpu0, other0, *_), (cpu1, other1, *_) in zip(marks, marks[1:], strict=False)
    )
    n = len(per_step)
    return {
        "engine_us": sum(per_step) / n * 1e6,
        "p50_us": per_step[n // 2] * 1e6,
        "p99_us": per_step[min(n - 1, int(n * 0.99))] * 1e6,
        "max_us": per_step[-1] * 1e6,
        "kv_planning_us": (marks[-1][3] - marks[0][3]) / n * 1e6,
        "wall_us": (marks[-1][2] - marks[0][2]) / n * 1e6,
        "plans_per_iteration": plans / (n + skip),
        "holding_kv": holding,
    }


def engine_time(
    policy_name: str, queued: int, iterations: int, seed: int = 0, redis_url: str = ""
) -> dict[str, float]:
    """Per-iteration CPU of the whole Engine loop with `queued` jobs, all holding KV (microseconds).

    With `redis_url`, the Engine's job log writes that Redis, one flush per iteration (its client's
    CPU counts; the Redis server is another process); without, records go nowhere."""
    return asyncio.run(_engine_run(policy_name, queued, iterations, seed, redis_url))


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
        prog="python -m fastserve.bench.overhead",
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
    parser.add_argument(
        "--burst",
        type=int,
        default=0,
        help="with --metrics: send this many requests at once instead (greedy, --burst-tokens in and out) "
        "and report busy wall time / the worker's compute time",
    )
    parser.add_argument("--burst-tokens", type=int, default=64)
    parser.add_argument("--engine-iterations", type=int, default=2000, help="timed Engine iterations per run")
    parser.add_argument("--engine-only", action="store_true", help="skip the policy-only table")
    parser.add_argument(
        "--job-log",
        choices=("redis", "none"),
        default="redis",
        help="where the Engine's job log writes: a Redis started for the run (one flush per iteration), or nowhere",
    )
    parser.add_argument("--live-only", action="store_true", help="with --metrics: only the live part")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    policies = list(POLICIES) if args.policy == "all" else args.policy.split(",")
    if args.live_only:
        policies = []
    sizes = [int(n) for n in args.queued.split(",")]
    result: dict = {
        "iterations": args.iterations,
        "iteration_ms": CostModel.resolve("opt-13b-a100").decode_time(16, 16 * 500) * 1e3,
        "decision_us": {},
        "materialized_us": {},
        "add_remove_us": {},
        "engine_us": {},
    }
    redis = start_redis() if args.job_log == "redis" and policies else None
    print(
        "whole Engine loop per iteration, every queued job holding KV (microseconds of CPU; the KV\n"
        "manager's planning apart: another process in a deployment; job log: " + args.job_log + ")"
    )
    print(
        f"{'policy':<16}{'queued':>8}{'engine':>9}{'p50':>9}{'p99':>9}{'kv plan':>9}{'plans/it':>9}{'holding':>9}"
    )
    try:
        for name in policies:
            result["engine_us"][name] = {}
            for n in sizes:
                e = engine_time(name, n, args.engine_iterations, redis_url=redis[1] if redis else "")
                result["engine_us"][name][n] = e
                print(
                    f"{name:<16}{n:>8}{e['engine_us']:>9.1f}{e['p50_us']:>9.1f}{e['p99_us']:>9.1f}"
                    f"{e['kv_planning_us']:>9.1f}{e['plans_per_iteration']:>9.2f}{e['holding_kv']:>9}",
                    flush=True,
                )
    finally:
        if redis is not None:
            redis[0].terminate()
    result["job_log"] = args.job_log
    if args.engine_only:
        policies = []
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

        from fastserve.bench.load import replay

        before = scrape(args.metrics)
        if args.burst:
            trace = [(0.0, args.burst_tokens, args.burst_tokens)] * args.burst
        else:
            trace = [(i * 0.05, 64, 32) for i in range(args.requests)]
        records, _ = asyncio.run(replay(args.gateway, trace, 0, f"overhead-{int(time.time())}"))
        after = scrape(args.metrics)
        result["live_seconds"] = live_breakdown(before, after)
        for key, value in result["live_seconds"].items():
            print(f"live {key:<22} {value * 1e3:9.3f} ms")
        if args.burst:
            wall = max(r.finish for r in records) - min(r.arrival for r in records)
            compute = (
                after["fastserve:worker_compute_seconds_sum"] - before["fastserve:worker_compute_seconds_sum"]
            )
            result["burst"] = {
                "requests": args.burst,
                "tokens": sum(r.output_tokens for r in records),
                "busy_wall_seconds": wall,
                "worker_compute_seconds": compute,
                "ratio": wall / compute,
            }
            print(
                f"burst of {args.burst} x {args.burst_tokens} tokens: busy wall {wall:.2f} s, "
                f"worker compute {compute:.2f} s, ratio {wall / compute:.2f}"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
