"""`fastserve up`: the whole stack on one machine, each service its own process.

Starts Redis (embedded unless --redis-url), the KV manager, tp*pp workers, the
scheduler and the gateway; waits until each answers SERVING on grpc.health.v1;
prints the gateway address; streams a few demo generations; serves until Ctrl-C
or SIGTERM, then stops every child (children also die with this process).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from fastserve.flags import add_common_flags, add_flag, setup_logging
from fastserve.procs import free_ports, popen_child, stop_all
from fastserve.rpc import check_serving_sync

log = logging.getLogger("fastserve.up")

DEMO_PROMPTS = ["FastServe preempts at every token.", "Short jobs first:", "Hello"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve up", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_flag(parser, "--host", default="0.0.0.0", help="gateway listen address", env="FASTSERVE_GATEWAY_HOST")
    add_flag(parser, "--port", default=50051, help="gateway port")
    add_flag(parser, "--model", default="opt-tiny", help="preset name, checkpoint directory or hub id")
    add_flag(
        parser, "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16"
    )
    add_flag(parser, "--device", default="auto", help="auto (cuda when present), cpu, cuda")
    add_flag(parser, "--redis-url", default="", help="Redis to use; empty = start an embedded redis-server")
    add_flag(parser, "--policy", default="skip-join-mlfq", help="fcfs, mlfq, skip-join-mlfq or srpt-oracle")
    add_flag(parser, "--tp", default=1, help="tensor-parallel size")
    add_flag(parser, "--pp", default=1, help="pipeline-parallel size")
    add_flag(parser, "--max-batch-size", default=16, help="most jobs in one iteration")
    add_flag(parser, "--max-num-batched-tokens", default=2048, help="most tokens fed in one iteration")
    add_flag(parser, "--num-gpu-blocks", default=0, help="KV blocks per worker; 0 = size from memory")
    add_flag(parser, "--num-host-blocks", default=0, help="host KV blocks per worker; 0 = from --swap-space")
    add_flag(parser, "--swap-space", default=4.0, help="GiB of host memory per worker for swapped-out KV")
    add_flag(parser, "--swap-policy", default="proactive", help="KV swapping: proactive, reactive, recompute")
    # MLFQ knobs and worker threads: empty = the service's own default (fastserve imports no service)
    for flag, (service, kind, help_text) in SERVICE_KNOBS.items():
        add_flag(
            parser,
            flag,
            default="",
            type=optional(kind),
            help=f"{service}: {help_text}; empty = the service's default",
        )
    add_flag(parser, "--demo", default=True, help="stream a few generations once the stack is up")
    add_flag(parser, "--exit-after-demo", default=False, help="stop the stack after the demo (for scripts)")
    add_flag(parser, "--start-timeout", default=600.0, help="seconds to wait for every service to be SERVING")
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error(f"--tp and --pp must be >= 1, got {args.tp} and {args.pp}")
    return args


SERVICE_KNOBS = {  # flag of `up` -> (the service it goes to when given, type, what it sets)
    "--base-quantum": ("scheduler", float, "seconds of Q0's quantum (0 = one profiled decode iteration)"),
    "--quantum-ratio": ("scheduler", float, "q_i = base * ratio^i"),
    "--num-queues": ("scheduler", int, "MLFQ queue count"),
    "--starvation-threshold": ("scheduler", float, "α, seconds without running before promotion to Q0"),
    "--starvation-period": ("scheduler", int, "iterations between starvation checks"),
    "--num-threads": ("worker", int, "torch CPU threads per rank"),
}


def optional(kind: type) -> Callable[[str], str]:
    """An argparse type: empty stays empty, anything else must parse as `kind` (checked up front)."""

    def check(text: str) -> str:
        if text:
            kind(text)
        return text

    check.__name__ = kind.__name__  # argparse names the type in its error
    return check


def knob_flags(args: argparse.Namespace, service: str) -> list[str]:
    """The SERVICE_KNOBS given to `up` that go to `service` ("scheduler" or "worker"), as its flags."""
    out = []
    for flag, (target, _, _) in SERVICE_KNOBS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value != "" and target == service:
            out += [flag, value]
    return out


def as_flags(**values: object) -> list[str]:
    """as_flags(max_batch_size=4) -> ["--max-batch-size", "4"]"""
    return [part for name, value in values.items() for part in (f"--{name.replace('_', '-')}", str(value))]


class Stack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.addresses: dict[str, str] = {}

    def spawn(self, name: str, module: str, flags: list[str]) -> None:
        cmd = [sys.executable, "-m", module, *flags, "--log-level", self.args.log_level]
        self.procs.append((name, popen_child(cmd)))

    def wait_serving(self, name: str, address: str) -> None:
        self.addresses[name] = address
        proc = dict(self.procs)[name]
        deadline = time.monotonic() + self.args.start_timeout
        while not check_serving_sync(address):
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode} before it was SERVING")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} at {address} not SERVING after {self.args.start_timeout:.0f}s")
            time.sleep(0.2)
        log.info("%s SERVING on %s", name, address)

    def start(self) -> str:
        args = self.args
        redis_url = args.redis_url
        if not redis_url:
            from fastserve.embedded_redis import start_redis

            proc, redis_url = start_redis()
            self.procs.append(("redis", proc))
        self.addresses["redis"] = redis_url
        world = args.tp * args.pp
        kv_port, sched_port, sched_metrics, gw_metrics, master_port, *worker_ports = free_ports(5 + world)
        kv_addr, sched_addr = f"127.0.0.1:{kv_port}", f"127.0.0.1:{sched_port}"
        worker_addrs = [f"127.0.0.1:{port}" for port in worker_ports]
        self.addresses["scheduler-metrics"] = f"127.0.0.1:{sched_metrics}"
        self.addresses["gateway-metrics"] = f"{args.host}:{gw_metrics}"
        self.spawn("kvmanager", "services.kvmanager", as_flags(port=kv_port))
        for rank, port in enumerate(worker_ports):
            self.spawn(
                f"worker{rank}",
                "services.worker",
                as_flags(
                    port=port,
                    model=args.model,
                    dtype=args.dtype,
                    device=args.device,
                    num_gpu_blocks=args.num_gpu_blocks,
                    num_host_blocks=args.num_host_blocks,
                    swap_space=args.swap_space,
                    rank=rank,
                    world_size=world,
                    tp=args.tp,
                    pp=args.pp,
                    master_addr="127.0.0.1",
                    master_port=master_port,
                )
                + knob_flags(args, "worker"),
            )
        self.spawn(
            "scheduler",
            "services.scheduler",
            as_flags(
                port=sched_port,
                metrics_port=sched_metrics,
                worker_addresses=",".join(worker_addrs),
                kvmanager_address=kv_addr,
                redis_url=redis_url,
                policy=args.policy,
                swap_policy=args.swap_policy,
                max_batch_size=args.max_batch_size,
                max_num_batched_tokens=args.max_num_batched_tokens,
            )
            + knob_flags(args, "scheduler"),
        )
        self.spawn(
            "gateway",
            "services.gateway",
            as_flags(
                host=args.host,
                port=args.port,
                metrics_port=gw_metrics,
                scheduler_address=sched_addr,
                redis_url=redis_url,
            ),
        )
        self.wait_serving("kvmanager", kv_addr)
        for rank, addr in enumerate(worker_addrs):
            self.wait_serving(f"worker{rank}", addr)
        self.wait_serving("scheduler", sched_addr)
        gateway = f"{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
        self.wait_serving("gateway", gateway)
        return gateway

    def stop(self) -> None:
        stop_all([proc for _, proc in reversed(self.procs)])

    def watch(self) -> None:
        """Returns when a child dies (a stack with a dead part is not serving)."""
        while True:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with status {proc.returncode}")
            time.sleep(0.5)


def run_demo(gateway: str) -> None:
    from fastserve.client import stream_generate

    for seed, prompt in enumerate(DEMO_PROMPTS):
        print(f"\n>>> {prompt!r} (temperature 0.8, top-k 5, seed {seed})", flush=True)
        stream_generate(gateway, prompt, max_tokens=24, temperature=0.8, top_k=5, seed=seed, out=sys.stdout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, "up")
    stack = Stack(args)

    def on_signal(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    code = 0
    try:
        gateway = stack.start()
        print(
            f"FastServe is up: gateway on {gateway} (model {args.model}, policy {args.policy}, "
            f"tp={args.tp}, pp={args.pp}). Ctrl-C stops it.",
            flush=True,
        )
        if args.demo:
            run_demo(gateway)
            print(f"\nTry: fastserve generate 'Your prompt' --address {gateway}", flush=True)
        if not args.exit_after_demo:
            stack.watch()
    except KeyboardInterrupt:
        print("\nstopping FastServe...", flush=True)
    except RuntimeError as exc:
        log.error("%s", exc)
        code = 1
    finally:
        stack.stop()
    return code
