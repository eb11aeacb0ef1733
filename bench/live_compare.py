"""Policies side by side on the live stack: `fastserve up` + `fastserve bench` per policy.

For each policy: starts `fastserve up --policy P` (no demo) as a subprocess, waits for
the gateway address it prints, replays the same trace (same workload, rate, seed, clips)
through `fastserve bench` (fastserve.bench.load.main), stops the stack with SIGTERM and checks that
none of its children are left. Prints a table and writes one JSON with every result.

Where the time went (`control_plane` in each result, a second table): the scheduler's
iteration count, the worker's own compute, the KV plan round trips and each service's
CPU seconds over the run (from the scheduler's /metrics and /proc).

The stack runs with OMP_NUM_THREADS=1 by default (--threads): on a small shared machine a
multi-threaded torch worker slows down several times when another process holds a core.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastserve.bench.load import main as bench_main
from fastserve.bench.overhead import scrape
from fastserve.procs import free_port, stop_all

UP_LINE = re.compile(r"gateway on (\S+) \(")
GIT_DESCRIBE = ["git", "describe", "--always", "--dirty"]


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (from /proc's parent ids)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


SERVICES = ("gateway", "scheduler", "kvmanager", "worker")


def services(pids: list[int]) -> dict[str, tuple[int, str]]:
    """The stack's service processes: name -> (pid, scheduler metrics address or "")."""
    found: dict[str, tuple[int, str]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
            module = argv[argv.index("-m") + 1] if "-m" in argv else ""
            name = next((n for n in SERVICES if module.startswith(f"fastserve.services.{n}")), "")
            if name and name not in found:
                port = argv[argv.index("--metrics-port") + 1] if "--metrics-port" in argv else ""
                found[name] = (pid, f"127.0.0.1:{port}" if name == "scheduler" and port else "")
    return found


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def snapshot(procs: dict[str, tuple[int, str]]) -> dict[str, float]:
    """The scheduler's metrics and every service's CPU seconds, now."""
    out = {f"cpu:{name}": cpu_seconds(pid) for name, (pid, _) in procs.items()}
    metrics = procs.get("scheduler", (0, ""))[1]
    return out | (scrape(metrics) if metrics else {})


def control_plane(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What the run cost, from two snapshots: iterations, compute, plan round trips, CPU per service."""

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    out = {
        "iterations": delta("fastserve:iteration_time_seconds_count"),
        "iteration_seconds": delta("fastserve:iteration_time_seconds_sum"),
        "worker_compute_seconds": delta("fastserve:worker_compute_seconds_sum"),
        "kv_plans": delta("fastserve:kv_plan_seconds_count"),
        "kv_plan_seconds": delta("fastserve:kv_plan_seconds_sum"),
        "policy_seconds": delta("fastserve:policy_decision_seconds_sum"),
    }
    return out | {key: delta(key) for key in after if key.startswith("cpu:")}


def run_policy(policy: str, args: argparse.Namespace, bench_argv: list[str], log: Path) -> dict:
    """One policy: stack up, bench, stack down. Returns the bench result object."""
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    up_cmd = [sys.executable, "-m", "fastserve.cli", "up", "--policy", policy, "--demo", "false"]
    up_cmd += ["--host", "127.0.0.1", "--port", str(free_port()), "--http-port", "0", "--model", args.model]
    up_cmd += ["--max-batch-size", str(args.max_batch_size), "--log-level", "WARNING", *args.up_flags]
    with open(log, "w") as out:
        up = subprocess.Popen(up_cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    children: list[int] = []
    try:
        deadline = time.monotonic() + args.start_timeout
        while not (match := UP_LINE.search(log.read_text())):
            if up.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"`fastserve up --policy {policy}` did not come up; see {log}")
            time.sleep(0.5)
        children = descendants(up.pid)
        procs = services(children)
        with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
            path = f"{tmp}/result.json"
            before = snapshot(procs)
            started = time.monotonic()
            bench_main([*bench_argv, "--address", match.group(1), "--json", path])
            wall = time.monotonic() - started
            after = snapshot(procs)
            result = json.loads(Path(path).read_text())[-1]
        result["wall_seconds"], result["loadavg_1m_after"] = wall, os.getloadavg()[0]  # co-tenant load
        result["control_plane"] = control_plane(before, after)
        return result
    finally:
        stop_all([up], timeout=60)  # SIGTERM (what Ctrl-C does), SIGKILL after a minute
        deadline = time.monotonic() + 15
        while (left := [p for p in children if Path(f"/proc/{p}").exists()]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if left:
            print(f"warning: {policy}: children of `fastserve up` still alive: {left}", file=sys.stderr)


def git_commit() -> str:
    """The checkout the stacks run (`git describe --always --dirty`)."""
    return subprocess.run(GIT_DESCRIBE, capture_output=True, text=True).stdout.strip()


def table(results: list[dict]) -> str:
    base = results[0]["latency_per_token"]["mean"]
    lines = [
        f"| policy | latency/token mean ms | p50 ms | p95 ms | vs {results[0]['policy']} | "
        "TTFT mean s | JCT mean s | preemptions |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lat = r["latency_per_token"]
        lines.append(
            f"| {r['policy']} | {lat['mean'] * 1e3:.1f} | {lat['p50'] * 1e3:.1f} | {lat['p95'] * 1e3:.1f} | "
            f"{base / lat['mean']:.2f}x | {r['ttft']['mean']:.3f} | {r['jct']['mean']:.3f} | {r['preemptions']} |"
        )
    return "\n".join(lines)


def cost_table(results: list[dict]) -> str:
    """Per iteration: wall (scheduler's view), worker compute, plan round trips, CPU of each service."""
    lines = [
        "| policy | output tok/s | iterations | ms/iteration | compute ms/it | plans/it | plan ms/it | "
        + " | ".join(f"{n} CPU ms/it" for n in SERVICES)
        + " |",
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(SERVICES),
    ]
    for r in results:
        c = r["control_plane"]
        n = c["iterations"] or float("nan")
        cpu = " | ".join(f"{c.get(f'cpu:{name}', float('nan')) / n * 1e3:.2f}" for name in SERVICES)
        lines.append(
            f"| {r['policy']} | {r['output_throughput']:.1f} | {n:.0f} | {c['iteration_seconds'] / n * 1e3:.2f} | "
            f"{c['worker_compute_seconds'] / n * 1e3:.2f} | {c['kv_plans'] / n:.2f} | "
            f"{c['kv_plan_seconds'] / n * 1e3:.2f} | {cpu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.live_compare",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--policies", default="fcfs,skip-join-mlfq", help="comma list; first = baseline")
    parser.add_argument("--model", default="opt-tiny")
    parser.add_argument("--max-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the stack (0 = unset)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--up-flag", dest="up_flags", action="append", default=[], help="extra `up` flag")
    parser.add_argument("--workload", default="alpaca")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-input-len", type=int, default=0)
    parser.add_argument("--max-output-len", type=int, default=512)
    parser.add_argument("--slo", type=float, default=0.3)
    parser.add_argument("--log-dir", default=tempfile.gettempdir(), help="where `fastserve up` logs go")
    parser.add_argument("--json", default="", help="write every policy's result here")
    args = parser.parse_args(argv)
    bench_argv = [
        *("--workload", args.workload, "--rate", str(args.rate), "--cv", str(args.cv)),
        *("--num-requests", str(args.num_requests), "--seed", str(args.seed), "--slo", str(args.slo)),
        *("--max-input-len", str(args.max_input_len), "--max-output-len", str(args.max_output_len)),
    ]
    commit, results = git_commit(), []
    for policy in args.policies.split(","):
        print(f"{policy}: starting the stack", file=sys.stderr, flush=True)
        log = Path(args.log_dir) / f"live_compare_{policy}.log"
        results.append(run_policy(policy, args, bench_argv, log))
        print(f"{policy}: {results[-1]['wall_seconds']:.0f}s", file=sys.stderr, flush=True)
    print(table(results))
    print(cost_table(results))
    if git_commit() != commit:
        print(f"warning: the checkout changed during the run (was {commit})", file=sys.stderr)
    if args.json:
        out = {"command": sys.argv, "commit": commit, "config": vars(args), "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
