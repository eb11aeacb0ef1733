"""How much KV swapping the live stack hides behind compute.

Starts the whole stack (`fastserve up` without the demo) with a GPU tier too small
for the load, replays a trace through the gateway, and reads the scheduler's
swap counters: total transfer time on the driver rank and the part compute waited
for (exposed). Prints and saves both and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from fastserve.bench.load import replay
from fastserve.bench.overhead import scrape
from fastserve.bench.workloads import load_trace
from fastserve.launcher import Stack
from fastserve.launcher import parse_args as up_args
from fastserve.procs import free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.swap_overlap", description=__doc__, allow_abbrev=False
    )
    parser.add_argument("--model", default="opt-tiny")
    parser.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    parser.add_argument("--num-gpu-blocks", type=int, default=48)
    parser.add_argument("--num-host-blocks", type=int, default=4096)
    parser.add_argument("--swap-policy", default="proactive")
    parser.add_argument("--policy", default="skip-join-mlfq", help="scheduling policy of the stack")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--workload", default="alpaca")
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--max-len", type=int, default=256, help="clip input and output lengths")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    stack = Stack(
        up_args(
            [
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--http-port",
                "0",
                "--model",
                args.model,
                "--device",
                args.device,
                "--demo",
                "false",
                "--num-gpu-blocks",
                str(args.num_gpu_blocks),
                "--num-host-blocks",
                str(args.num_host_blocks),
                "--swap-policy",
                args.swap_policy,
                "--policy",
                args.policy,
                "--max-batch-size",
                str(args.max_batch_size),
                "--log-level",
                "WARNING",
            ]
        )
    )
    try:
        gateway = stack.start()
        trace = [
            (a, min(i, args.max_len), min(o, args.max_len))
            for a, i, o in load_trace(args.workload, args.num_requests, args.rate, seed=0)
        ]
        started = time.monotonic()
        records, _ = asyncio.run(replay(gateway, trace, 0, f"swap-{int(time.time())}"))
        wall = time.monotonic() - started
        metrics = scrape(stack.addresses["scheduler-metrics"])
    finally:
        stack.stop()
    transfer = metrics.get("fastserve:swap_transfer_seconds_total", 0.0)
    exposed = metrics.get("fastserve:swap_exposed_seconds_total", 0.0)
    result = {
        "model": args.model,
        "device": args.device,
        "swap_policy": args.swap_policy,
        "policy": args.policy,
        "num_gpu_blocks": args.num_gpu_blocks,
        "requests": len(records),
        "wall_seconds": wall,
        "swap_bytes_out": metrics.get('fastserve:swap_bytes_total{direction="out"}', 0.0),
        "swap_bytes_in": metrics.get('fastserve:swap_bytes_total{direction="in"}', 0.0),
        "recomputes": metrics.get("fastserve:num_recomputes_total", 0.0),
        "transfer_seconds": transfer,
        "exposed_seconds": exposed,
        "exposed_fraction": exposed / transfer if transfer else None,
        "iteration_seconds_total": metrics.get("fastserve:iteration_time_seconds_sum", 0.0),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
