"""Busy wall time / the worker's own compute on a burst, on a fresh `fastserve up` stack.

Starts the stack (embedded Redis, kvmanager, workers, scheduler, gateway) with the given
`up` flags, sends `--requests` greedy requests of `--tokens` prompt and output tokens at
once (fastserve.bench.overhead --burst) and prints busy wall / Δ fastserve:worker_compute_seconds
(read from the scheduler's /metrics) plus the per-iteration breakdown, then stops it.

    python -m fastserve.bench.live_ratio --requests 64 --tokens 64 -- --model opt-tiny --max-batch-size 16 --num-threads 1
"""

from __future__ import annotations

import argparse
import sys

from fastserve.bench.overhead import main as overhead_main
from fastserve.launcher import Stack, parse_args
from fastserve.procs import free_port


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastserve.bench.live_ratio", description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", default="")
    parser.add_argument("up_flags", nargs="*", help="flags for `fastserve up` (after --)")
    args = parser.parse_args(argv)
    up = parse_args(
        ["--host", "127.0.0.1", "--port", str(free_port()), "--demo", "false", "--log-level", "WARNING"]
        + args.up_flags
    )
    stack = Stack(up)
    try:
        gateway = stack.start()
        extra = ["--json", args.json] if args.json else []
        return overhead_main(
            [
                "--metrics",
                stack.addresses["scheduler-metrics"],
                "--gateway",
                gateway,
                "--burst",
                str(args.requests),
                "--burst-tokens",
                str(args.tokens),
                "--live-only",
                *extra,
            ]
        )
    finally:
        stack.stop()


if __name__ == "__main__":
    sys.exit(main())
