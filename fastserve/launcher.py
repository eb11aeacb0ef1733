"""`fastserve up`: the whole stack on one machine, each service its own process.

Starts Redis (embedded unless --redis-url), the KV manager, tp*pp workers, the
scheduler and the gateway; waits until each answers SERVING on grpc.health.v1;
prints the gateway address; streams a few demo generations; serves until Ctrl-C
or SIGTERM, then stops every child (children also die with this process).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fastserve.child_output import Relay
from fastserve.flags import add_common_flags, add_flag, parse_auto_bool, parse_bool, setup_logging
from fastserve.liveness import Liveness, scheduler_step_timeout
from fastserve.procs import free_port, free_ports, popen_child, stop_all
from fastserve.rpc import check_serving_sync

log = logging.getLogger("fastserve.up")

DEMO_PROMPTS = ["FastServe preempts at every token.", "Short jobs first:", "Hello"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve up",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_flag(
        parser,
        "--host",
        default="127.0.0.1",
        help="address of the public ports (gRPC, HTTP, metrics); 0.0.0.0 exposes them on every interface",
    )
    add_flag(parser, "--port", default=50051, help="gRPC port of the gateway")
    add_flag(parser, "--http-port", default=8000, help="OpenAI-compatible HTTP port of the gateway; 0 = off")
    add_flag(parser, "--model", default="opt-tiny", help="preset name, checkpoint directory or hub id")
    add_flag(
        parser, "--served-model-name", default="", help="the model's name in the HTTP API; empty = --model"
    )
    add_flag(
        parser,
        "--api-key",
        default="",
        help="comma-separated API keys the public ports require; empty = open",
    )
    add_flag(parser, "--ssl-certfile", default="", help="TLS certificate (PEM) for the public ports")
    add_flag(parser, "--ssl-keyfile", default="", help="TLS private key (PEM) for the public ports")
    add_flag(
        parser, "--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float32, float16, bfloat16"
    )
    add_flag(parser, "--device", default="auto", help="auto (cuda when present), cpu, cuda")
    add_flag(parser, "--redis-url", default="", help="Redis to use; empty = start an embedded redis-server")
    choices = service_choices()
    add_flag(
        parser,
        "--policy",
        default="skip-join-mlfq",
        help=f"scheduling policy: {choices['policy_help']}",
        choices=choices["policy"],
    )
    add_flag(
        parser,
        "--async-scheduling",
        default="auto",
        type=parse_auto_bool,
        const="true",
        help="scheduler: auto (on with GPU workers, off with CPU ones), true or false: send a job's next step "
        "before its last token is back (the workers keep it); without pipeline parallelism",
    )
    add_flag(
        parser,
        "--job-log-interval",
        default=0.02,
        help="scheduler: seconds between two writes of the job records to Redis (a job's final state at once)",
    )
    add_flag(
        parser,
        "--tensor-parallel-size",
        default=1,
        help="tensor-parallel size",
        aliases=("-tp", "--tp"),
        dest="tp",
    )
    add_flag(
        parser,
        "--pipeline-parallel-size",
        default=1,
        help="pipeline-parallel size",
        aliases=("-pp", "--pp"),
        dest="pp",
    )
    add_flag(
        parser,
        "--max-num-seqs",
        default=128,
        help="most jobs in one iteration",
        aliases=("--max-batch-size",),
        dest="max_batch_size",
    )
    add_flag(
        parser,
        "--max-model-len",
        default=0,
        help="most tokens (prompt + output) of one request; 0 = the model's",
    )
    add_flag(parser, "--block-size", default=16, help="tokens per KV block")
    add_flag(parser, "--gpu-memory-utilization", default=0.9, help="fraction of GPU memory a worker may fill")
    add_flag(parser, "--num-gpu-blocks", default=0, help="KV blocks per worker; 0 = size from memory")
    add_flag(parser, "--num-host-blocks", default=0, help="host KV blocks per worker; 0 = from --swap-space")
    add_flag(parser, "--swap-space", default=4.0, help="GiB of host memory per worker for swapped-out KV")
    add_flag(
        parser,
        "--swap-policy",
        default="proactive",
        help="KV swapping: reserve + prefetch, swap on demand, or drop and recompute",
        choices=choices["swap_policy"],
    )
    # MLFQ knobs and worker threads: empty = the service's own default (fastserve imports no service)
    for flag, (service, kind, help_text) in SERVICE_KNOBS.items():
        add_flag(
            parser,
            flag,
            default="",
            type=optional(kind),
            help=f"{service}: {help_text}; empty = the service's default",
        )
    add_flag(
        parser,
        "--data-dir",
        default="~/.cache/fastserve",
        help="where the embedded Redis keeps its append-only file (one subfolder per gateway port)",
    )
    add_flag(
        parser,
        "--max-restarts-per-minute",
        default=5,
        help="restarts of one service (or worker group) per minute before `up` gives up",
    )
    add_flag(
        parser,
        "--keep-work-on-stop",
        default=False,
        help="on SIGTERM/Ctrl-C leave unfinished jobs in Redis for the next `up` (each cancelled unless a "
        "gateway re-attaches within --orphan-timeout) instead of cancelling them",
    )
    add_flag(parser, "--demo", default=True, help="stream a few generations once the stack is up")
    add_flag(parser, "--exit-after-demo", default=False, help="stop the stack after the demo (for scripts)")
    add_flag(parser, "--start-timeout", default=600.0, help="seconds to wait for every service to be SERVING")
    add_flag(
        parser,
        "--gateway-pythonmalloc",
        default="malloc",
        choices=["pymalloc", "malloc"],
        help="PYTHONMALLOC for the gateway: 'malloc' (default) lets its RSS return to within a few %% after "
        "a flash crowd (glibc gives back free pages, pymalloc only whole 1 MiB arenas) for ~10-20 %% more "
        "gateway CPU; 'pymalloc' is Python's own allocator",
    )
    add_common_flags(parser)
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        parser.error(
            f"--tensor-parallel-size and --pipeline-parallel-size must be >= 1, got {args.tp} and {args.pp}"
        )
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        parser.error("--ssl-certfile and --ssl-keyfile go together")
    return args


@functools.cache
def service_choices() -> dict:
    """The policies the scheduler registers (and what each does) and the swap policies the KV manager plans, asked of
    the services' own (light, pure-Python) packages in a child process: fastserve imports no service."""
    code = (
        "import json; from fastserve.services.scheduler.policy import POLICIES, policy_help; "
        "from fastserve.services.kvmanager.planner import SWAP_POLICIES; "
        "print(json.dumps({'policy': sorted(POLICIES), 'policy_help': policy_help(), "
        "'swap_policy': list(SWAP_POLICIES)}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out)


SERVICE_KNOBS = {  # flag of `up` -> (the service it goes to when given, type, what it sets)
    "--base-quantum": ("scheduler", float, "seconds of Q0's quantum (0 = one profiled decode iteration)"),
    "--quantum-ratio": ("scheduler", float, "q_i = base * ratio^i"),
    "--num-queues": ("scheduler", int, "MLFQ queue count"),
    "--starvation-threshold": ("scheduler", float, "α, seconds without running before promotion to Q0"),
    "--starvation-period": ("scheduler", int, "iterations between starvation checks"),
    "--length-predictor": ("scheduler", str, "output-length model (.npz) the predicted-* policies read"),
    "--max-num-batched-tokens": ("scheduler", int, "most tokens fed in one iteration"),
    "--stream-interval": ("scheduler", int, "a job's tokens streamed this many at a time (1 = each at once)"),
    "--enable-chunked-prefill": (
        "scheduler",
        parse_bool,
        "split prefills that do not fit --max-num-batched-tokens into chunks beside the decodes",
    ),
    "--step-timeout": (
        "scheduler",
        float,
        "seconds a worker step or KV plan may go unanswered before that peer is hung (NOT_SERVING); "
        "`up` also kills and restarts a child silent to health checks that long",
    ),
    "--orphan-timeout": (
        "scheduler",
        float,
        "seconds a job restored after a scheduler restart waits for its gateway before it is cancelled",
    ),
    "--num-threads": ("worker", int, "torch CPU threads per rank"),
    "--preload-libs": (
        "worker",
        str,
        "CPU runtime libraries loaded before torch: auto (Intel OpenMP, tcmalloc), none, or a list",
    ),
    "--enforce-eager": (
        "worker",
        parse_bool,
        "true = the reference model path (no prepacked weights, no graphs)",
    ),
    "--max-num-waiting": ("gateway", int, "admission: most requests waiting for a first token (then 429)"),
    "--max-concurrent-requests": ("gateway", int, "admission: most requests one gateway streams (then 429)"),
    "--max-request-bytes": ("gateway", int, "largest parsed GenerateRequest (HTTP 400, INVALID_ARGUMENT)"),
    "--max-request-body-bytes": ("gateway", int, "largest request body (HTTP 413, gRPC RESOURCE_EXHAUSTED)"),
    "--max-prompt-chars": ("gateway", int, "longest prompt in characters, refused before tokenizing"),
    "--max-prompts-per-request": ("gateway", int, "most prompts in one /v1/completions request"),
    "--http-header-timeout": ("gateway", float, "seconds a connection may take to send request headers"),
    "--timeout-keep-alive": ("gateway", float, "seconds an idle HTTP keep-alive connection stays open"),
    "--stream-send-timeout": (
        "gateway",
        float,
        "seconds a stream's client may read nothing before it is cancelled",
    ),
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
    """The SERVICE_KNOBS given to `up` that go to `service` ("scheduler", "worker", "gateway"), as its flags."""
    out = []
    for flag, (target, _, _) in SERVICE_KNOBS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value != "" and target == service:
            out += [flag, value]
    return out


def as_flags(**values: object) -> list[str]:
    """as_flags(max_batch_size=4) -> ["--max-batch-size", "4"]"""
    return [part for name, value in values.items() for part in (f"--{name.replace('_', '-')}", str(value))]


def scheduler_flags(
    args: argparse.Namespace,
    port: int,
    metrics_port: int,
    model_name: str,
    worker_addrs: list[str],
    kv_addr: str,
) -> list[str]:
    """The scheduler's command line: its peers' addresses and what `up` passes through."""
    return as_flags(
        port=port,
        metrics_port=metrics_port,
        served_model_name=model_name,
        worker_addresses=",".join(worker_addrs),
        kvmanager_address=kv_addr,
        policy=args.policy,
        swap_policy=args.swap_policy,
        max_batch_size=args.max_batch_size,
        max_model_len=args.max_model_len,
        async_scheduling=args.async_scheduling,
        job_log_interval=args.job_log_interval,
        keep_work_on_stop=args.keep_work_on_stop,
    ) + knob_flags(args, "scheduler")


@dataclass
class Child:
    """One supervised process; `start` (re)creates it. Children of one group restart together."""

    name: str
    start: Callable[[], subprocess.Popen]
    group: str
    proc: subprocess.Popen | None = None


@dataclass
class Group:
    name: str
    children: list[Child]
    restarts: deque[float] = field(default_factory=deque)  # monotonic times of recent restarts
    restart_at: float | None = None  # when a pending restart is due

    def dead(self) -> list[Child]:
        return [c for c in self.children if c.proc is None or c.proc.poll() is not None]


def describe_exit(code: int | None) -> str:
    if code is None:
        return "running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit status {code}"


def check_port_free(host: str, port: int, flag: str = "--port") -> None:
    """Fails fast, naming the port and its flag, when something already listens on it."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC binds; only a listener refuses
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"port {port} on {host} is busy ({flag} {port}): {exc.strerror}") from None


def check_writable(data_dir: Path) -> None:
    """Fails with one line naming the directory and the flag when Redis could not keep its files there."""
    probe = data_dir / ".fastserve-write-probe"
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RuntimeError(
            f"--data-dir: cannot create or write {exc.filename or data_dir} ({exc.strerror}); "
            "pass a writable --data-dir, or --redis-url to use a Redis of your own"
        ) from None


SECRET_VARIABLES = ("FASTSERVE_API_KEY", "FASTSERVE_REDIS_URL", "FASTSERVE_INTERNAL_TOKEN")


class Stack:
    """The processes of one stack, each restarted when it dies (see supervise)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.groups: dict[str, Group] = {}
        self.addresses: dict[str, str] = {}
        self.token = getattr(args, "internal_token", "") or secrets.token_urlsafe(24)
        # each child gets only the secrets it uses: none from this process's environment, the stack's
        # token for the FastServe services, the Redis URL (its password) for the scheduler and the
        # gateway, the API keys for the gateway (see spawn calls)
        base = {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}
        self.base_env = base
        self.env = {**base, "FASTSERVE_INTERNAL_TOKEN": self.token}
        self.redis_env: dict[str, str] = {}
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self.liveness: Liveness | None = None
        self.output = Relay()  # what the children print: relayed, held during the demo, remembered

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen]]:
        return [(c.name, c.proc) for g in self.groups.values() for c in g.children if c.proc is not None]

    def child(self, name: str) -> Child:
        return next(c for g in self.groups.values() for c in g.children if c.name == name)

    def add(self, name: str, start: Callable[[], subprocess.Popen], group: str | None = None) -> None:
        child = Child(name, start, group or name)
        self.groups.setdefault(child.group, Group(child.group, [])).children.append(child)
        child.proc = start()

    def spawn(
        self,
        name: str,
        module: str,
        flags: Callable[[], list[str]],
        group: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        def start() -> subprocess.Popen:
            cmd = [sys.executable, "-m", module, *flags(), "--log-level", self.args.log_level]
            proc = popen_child(
                cmd, env={**self.env, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            self.output.follow(name, proc.stdout)
            return proc

        self.add(name, start, group)

    def exited(self, name: str, code: int | None) -> str:
        """' (model_type 'gpt2' is not 'opt')': a dead child's own last words, when it left some."""
        reason = self.output.fatal_reason(name)
        return f": {reason}" if reason else ""

    def wait_serving(self, name: str, address: str, root_cert: bytes | None = None) -> None:
        self.addresses[name] = address
        proc = self.child(name).proc
        deadline = time.monotonic() + self.args.start_timeout
        while not check_serving_sync(address, root_cert=root_cert):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} ({address}) stopped with {describe_exit(proc.returncode)} before it was SERVING"
                    + self.exited(name, proc.returncode)
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} at {address} not SERVING after {self.args.start_timeout:.0f}s")
            time.sleep(0.2)
        log.info("%s SERVING on %s", name, address)

    def start(self) -> str:
        args = self.args
        gateway_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        check_port_free(args.host, args.port)
        if args.http_port:
            check_port_free(args.host, args.http_port, "--http-port")
        redis_url = args.redis_url
        if not redis_url:
            redis_url = self._start_embedded_redis()
        self.addresses["redis"] = redis_url
        self.redis_env["FASTSERVE_REDIS_URL"] = redis_url  # not on a command line: it may hold a password
        world = args.tp * args.pp
        kv_port, sched_port, sched_metrics, gw_metrics, kv_metrics, *ports = free_ports(5 + 2 * world)
        worker_ports, worker_metrics = ports[:world], ports[world:]
        model_name = args.served_model_name or args.model
        kv_addr, sched_addr = f"127.0.0.1:{kv_port}", f"127.0.0.1:{sched_port}"
        worker_addrs = [f"127.0.0.1:{port}" for port in worker_ports]
        self.addresses["scheduler-metrics"] = f"127.0.0.1:{sched_metrics}"
        self.addresses["gateway-metrics"] = f"{args.host}:{gw_metrics}"
        self.addresses["kvmanager-metrics"] = f"127.0.0.1:{kv_metrics}"
        self.spawn(
            "kvmanager",
            "fastserve.services.kvmanager",
            lambda: as_flags(port=kv_port, metrics_port=kv_metrics, served_model_name=model_name),
        )
        master = {"port": free_port()}

        def new_world() -> None:  # a restarted TP x PP group forms a fresh torch.distributed world
            master["port"] = free_port()

        for rank, port in enumerate(worker_ports):
            self.addresses[f"worker{rank}-metrics"] = f"127.0.0.1:{worker_metrics[rank]}"
            self.spawn(
                f"worker{rank}",
                "fastserve.services.worker",
                lambda rank=rank, port=port: (
                    as_flags(
                        port=port,
                        metrics_port=worker_metrics[rank],
                        model=args.model,
                        dtype=args.dtype,
                        device=args.device,
                        num_gpu_blocks=args.num_gpu_blocks,
                        num_host_blocks=args.num_host_blocks,
                        swap_space=args.swap_space,
                        block_size=args.block_size,
                        gpu_memory_utilization=args.gpu_memory_utilization,
                        rank=rank,
                        world_size=world,
                        tp=args.tp,
                        pp=args.pp,
                        master_addr="127.0.0.1",
                        master_port=master["port"],
                    )
                    + knob_flags(args, "worker")
                ),
                group="workers",
            )
        self._before_restart = {"workers": new_world}
        self.spawn(
            "scheduler",
            "fastserve.services.scheduler",
            lambda: scheduler_flags(args, sched_port, sched_metrics, model_name, worker_addrs, kv_addr),
            env=self.redis_env,
        )
        self.spawn(
            "gateway",
            "fastserve.services.gateway",
            lambda: (
                as_flags(
                    host=args.host,
                    port=args.port,
                    http_port=args.http_port,
                    served_model_name=model_name,
                    metrics_port=gw_metrics,
                    scheduler_address=sched_addr,
                    ssl_certfile=args.ssl_certfile,
                    ssl_keyfile=args.ssl_keyfile,
                )
                + knob_flags(args, "gateway")
            ),
            env={
                **self.redis_env,
                "FASTSERVE_API_KEY": args.api_key,  # keys stay off the command line
                "PYTHONMALLOC": args.gateway_pythonmalloc,
            },
        )
        self.wait_serving("kvmanager", kv_addr)
        for rank, addr in enumerate(worker_addrs):
            self.wait_serving(f"worker{rank}", addr)
        self.wait_serving("scheduler", sched_addr)
        gateway = f"{gateway_host}:{args.port}"
        if args.http_port:
            self.addresses["http"] = (
                f"{'https' if args.ssl_certfile else 'http'}://{gateway_host}:{args.http_port}"
            )
        root_cert = Path(args.ssl_certfile).read_bytes() if args.ssl_certfile else None
        self.wait_serving("gateway", gateway, root_cert)
        return gateway

    def _start_embedded_redis(self) -> str:
        from fastserve.embedded_redis import start_redis

        port, password = free_port(), secrets.token_urlsafe(24)
        data_dir = Path(self.args.data_dir).expanduser() / f"redis-{self.args.port}"
        check_writable(data_dir)
        url = ""

        def start() -> subprocess.Popen:
            nonlocal url
            proc, url = start_redis(port, password, data_dir, env=self.base_env)
            return proc

        self.add("redis", start)
        log.info("embedded Redis keeps its append-only file in %s", data_dir)
        return url

    def stop(self) -> None:
        """The scheduler first (it cancels, or leaves, its jobs and writes its job log while Redis and
        the gateway still run: the clients hear `cancelled`), then everything else."""
        self._stop.set()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            self._supervisor.join()
        procs = [proc for _, proc in reversed(self.procs)]
        scheduler = [proc for name, proc in self.procs if name == "scheduler"]
        stop_all(scheduler, timeout=15.0)
        stop_all([proc for proc in procs if proc not in scheduler])

    # -- supervision ----------------------------------------------------------------------

    def supervise(self) -> None:
        """Restarts what dies, or hangs, until stop(); raises RuntimeError when a group keeps dying."""
        self.liveness = Liveness(self._watched, self._hang_timeout())
        self.liveness.start()
        try:
            while not self._stop.wait(0.2):
                for group in self.groups.values():
                    self._check(group)
        finally:
            self.liveness.stop()

    def _hang_timeout(self) -> float:
        """--step-timeout when given, else the one the scheduler derived from its profile."""
        if self.args.step_timeout:
            return float(self.args.step_timeout)
        if "scheduler" not in self.addresses:  # a stack without one (tests of the supervisor)
            return 60.0
        try:
            return scheduler_step_timeout(self.addresses["scheduler"], self.token)
        except grpc.RpcError as exc:
            log.warning(
                "cannot ask the scheduler its step timeout (%s); a silent child is hung after 60s", exc
            )
            return 60.0

    def _watched(self) -> dict[str, tuple[int, str]]:
        """The children whose health the liveness thread asks: every gRPC service (the gateway unless TLS)."""
        return {
            c.name: (c.proc.pid, self.addresses[c.name])
            for g in self.groups.values()
            for c in g.children
            if c.proc is not None
            and c.name in self.addresses
            and c.name != "redis"
            and not (c.name == "gateway" and self.args.ssl_certfile)
        }

    def _kill_hung(self, group: Group) -> None:
        for child in group.children:
            proc = child.proc
            if proc is None or proc.poll() is not None or self.liveness is None:
                continue
            if silent := self.liveness.hung(child.name, proc.pid):
                log.error(
                    "%s (pid %d) is hung: no answer to health checks for %.1fs (--step-timeout %g); killing it",
                    child.name,
                    proc.pid,
                    silent,
                    self.liveness.step_timeout,
                )
                proc.kill()
                proc.wait()

    def supervise_in_background(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise_logged, name="supervisor", daemon=True)
        self._supervisor.start()

    def _supervise_logged(self) -> None:
        try:
            self.supervise()
        except RuntimeError as exc:
            log.error("%s", exc)

    def _check(self, group: Group) -> None:
        now = time.monotonic()
        if group.restart_at is None:
            self._kill_hung(group)
            dead = group.dead()
            if not dead:
                return
            for child in dead:
                log.warning(
                    "%s stopped with %s%s",
                    child.name,
                    describe_exit(child.proc.returncode),
                    self.exited(child.name, child.proc.returncode),
                )
            for child in group.children:  # a TP x PP group restarts as a whole
                if child.proc is not None and child.proc.poll() is None:
                    log.warning("stopping %s: its group %s restarts as a whole", child.name, group.name)
                    child.proc.kill()
                    child.proc.wait()
            while group.restarts and now - group.restarts[0] > 60:
                group.restarts.popleft()
            if len(group.restarts) >= self.args.max_restarts_per_minute:
                raise RuntimeError(
                    f"{group.name} died {len(group.restarts) + 1} times within a minute "
                    f"(--max-restarts-per-minute {self.args.max_restarts_per_minute}); giving up"
                )
            delay = min(10.0, 0.25 * 2 ** len(group.restarts)) if group.restarts else 0.0
            group.restart_at = now + delay
            log.warning("restarting %s in %.2fs", group.name, delay)
        if now < group.restart_at:
            return
        group.restart_at = None
        group.restarts.append(now)
        if hook := getattr(self, "_before_restart", {}).get(group.name):
            hook()
        for child in group.children:
            try:
                child.proc = child.start()
            except RuntimeError as exc:  # e.g. Redis did not come up: counts as another death
                log.error("restarting %s failed: %s", child.name, exc)
                child.proc = None
        log.warning("restarted %s (pids %s)", group.name, [c.proc.pid for c in group.children if c.proc])


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
    failure = ""
    try:
        gateway = stack.start()
        http = stack.addresses.get("http")
        print(
            f"FastServe is up: gateway on {gateway}{f' and {http}/v1' if http else ''} (model {args.model}, "
            f"policy {args.policy}, tp={args.tp}, pp={args.pp}). Ctrl-C stops it.",
            flush=True,
        )
        metrics = [
            f"{name[: -len('-metrics')]} http://{addr}/metrics"
            for name, addr in stack.addresses.items()
            if name.endswith("-metrics")
        ]
        print("Prometheus metrics: " + ", ".join(metrics), flush=True)
        if args.demo:
            stack.output.hold()  # the services' logs wait until the demo's text is out
            try:
                run_demo(gateway)
                print(f"\nTry: fastserve generate 'Your prompt' --address {gateway}", flush=True)
            finally:
                stack.output.release()
        if not args.exit_after_demo:
            stack.supervise()
    except KeyboardInterrupt:
        print("\nstopping FastServe...", flush=True)
    except RuntimeError as exc:
        failure = str(exc)
        code = 1
    finally:
        stack.stop()
    if failure:  # the last line a user sees says why
        log.error("%s", failure)
    return code
