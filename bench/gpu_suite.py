"""The GPU suite: four GPU benchmarks, each in its own process under its own time budget,
gathered into one JSON file and one plot in one folder.

Parts (a part that fails or overruns is recorded with why and the others still run; the exit
status is 1 if any failed):

  attention  fastserve.bench.attention_kernel: the Triton decode kernel against the torch paths (CUDA only)
  decode     fastserve.bench.decode_bound: OPT-1.3B- and 6.7B-shaped decode throughput against the bandwidth bound
  swap       fastserve.bench.swap_overlap: exposed / total swap time on the live stack, OPT-6.7B shape
  live-M     fastserve.bench.live_ratio: busy wall / worker compute, 64 greedy requests of 64 tokens at once,
             --max-batch-size 16, one part per model M of --live-models
  vs-vllm    fastserve.bench.vs_vllm --device cuda: FastServe and vLLM's CUDA build on one random OPT-125m
             checkpoint (fp16), one after the other: greedy agreement, the ShareGPT trace at
             --vs-vllm-rates, `vllm bench serve` against both, per-iteration decode time at batch
             1/4/16 x context 128/512. Only when --parts names it (it needs vLLM: --vllm-python,
             which bench/gpu_suite.sh finds or builds), outside the 8-minute default set

Every model is a dummy-weight preset, so nothing is downloaded. ``--smoke`` shrinks every part
to opt-tiny and a few requests, so that ``--device cpu --smoke`` checks the suite on a CPU (the
attention part is skipped without CUDA). ``bench/gpu_suite.sh`` prepares the environment and
runs this; see docs/benchmarks.md, "GPU suite".

    python -m fastserve.bench.gpu_suite --out out/gpu-suite
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from fastserve.flags import add_flag

REPO_ROOT = Path(__file__).resolve().parents[1]
# seconds each part may run (live: each live part): 390 s with two live models, 440 s if every part
# overran and used its stop grace too, which leaves the venv's set-up room within 8 minutes
DEFAULT_BUDGETS = {"attention": 60.0, "decode": 80.0, "swap": 110.0, "live": 70.0, "vs-vllm": 480.0}
STOP_GRACE_S = 10  # after SIGINT, how long a part may take to stop its stack before SIGKILL


@dataclass(frozen=True)
class Part:
    name: str
    module: str  # run as `python -m module *args`
    args: list[str]
    budget_s: float
    result: Path  # the JSON file the part writes
    skip: str = ""  # why it does not run here; empty = it runs


def parse_budgets(text: str) -> dict[str, float]:
    """'attention=75,live=80' -> {'attention': 75.0, 'live': 80.0}"""
    budgets = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, _, seconds = item.partition("=")
        budgets[name.strip()] = float(seconds)
    return budgets


def plan(args: argparse.Namespace, device: str, out: Path) -> list[Part]:
    """The parts to run, at full shapes or (--smoke) tiny ones."""
    smoke = args.smoke
    budgets = {**DEFAULT_BUDGETS, **parse_budgets(args.budgets)}
    bandwidth = ["--bandwidth-gbs", str(args.bandwidth_gbs)] if args.bandwidth_gbs else []
    parts = [
        Part(
            "attention",
            "fastserve.bench.attention_kernel",
            [
                "--models",
                "opt-1.3b,opt-6.7b",
                "--batch-sizes",
                "1,4" if smoke else "1,16,64",
                "--context-lens",
                "64" if smoke else "512,2048",
                *(["--warmup", "1", "--iters", "2", "--repeats", "1"] if smoke else []),
                "--out",
                str(out / "attention.json"),
            ],
            budgets["attention"],
            out / "attention.json",
            skip="" if device == "cuda" else "no CUDA device: the Triton kernel is timed on a GPU only",
        ),
        Part(
            "decode",
            "fastserve.bench.decode_bound",
            [
                "--models",
                "opt-tiny" if smoke else args.decode_models,
                "--batch-sizes",
                "1,4" if smoke else "1,16,64",
                "--context",
                "32" if smoke else "512",
                "--steps",
                "4" if smoke else "32",
                "--device",
                device,
                *bandwidth,
                "--out",
                str(out / "decode.json"),
            ],
            budgets["decode"],
            out / "decode.json",
        ),
        Part(
            "swap",
            "fastserve.bench.swap_overlap",
            [
                "--model",
                "opt-tiny" if smoke else args.swap_model,
                "--device",
                device,
                "--num-gpu-blocks",
                "8" if smoke else "48",  # too few for the load: jobs swap out and back in
                "--num-host-blocks",
                "512",  # 4 GiB of pinned host memory at the OPT-6.7B shape (8 MiB a block)
                "--num-requests",
                "8" if smoke else "64",
                "--max-len",
                "32" if smoke else "256",
                # smoke: swapping must not depend on the machine's speed. All 8 jobs arrive at once
                # and least-attained-service preempts whoever just ran for one that has not, while
                # the GPU tier holds two jobs: every iteration swaps, however fast or slow it is
                *(["--rate", "1000", "--policy", "las"] if smoke else []),
                "--json",
                str(out / "swap.json"),
            ],
            budgets["swap"],
            out / "swap.json",
        ),
    ]
    requests = "8" if smoke else "64"
    for model in ["opt-tiny"] if smoke else [m.strip() for m in args.live_models.split(",") if m.strip()]:
        result = out / f"live-{model}.json"
        up = ["--model", model, "--max-batch-size", "16", "--device", device, "--http-port", "0"]
        # enough KV blocks for the burst (8 a job), not a pool sized from the whole GPU's memory
        up += ["--num-gpu-blocks", "1024", "--num-host-blocks", "64"]
        if device == "cpu":
            up += ["--num-threads", "1"]
        parts.append(
            Part(
                f"live-{model}",
                "fastserve.bench.live_ratio",
                ["--requests", requests, "--tokens", requests, "--json", str(result), "--", *up],
                budgets["live"],
                result,
            )
        )
    if "vs-vllm" in csv_names(args.parts):
        result = out / "vs-vllm" / "vs_vllm.json"
        vs_args = ["--device", device, "--vllm-python", args.vllm_python, "--out", str(out / "vs-vllm")]
        vs_args += ["--parts", "greedy,trace,anchor,step", "--rates", args.vs_vllm_rates]
        # fp16 on two implementations: the same greedy tokens, logprobs only close
        vs_args += ["--logprob-tolerance", "0.05", "--max-extra-rates", "1"]
        if smoke:
            vs_args += ["--layers", "2", "--hidden", "128", "--num-requests", "8", "--step-batches", "1,4"]
            vs_args += ["--step-contexts", "32", "--rates", "2"]
        skip = (
            ""
            if args.vllm_python
            else "no vLLM: --vllm-python (bench/gpu_suite.sh --vllm-wheels DIR builds one)"
        )
        parts.append(
            Part("vs-vllm", "fastserve.bench.vs_vllm", vs_args, budgets["vs-vllm"], result, skip=skip)
        )
    return parts


def csv_names(text: str) -> set[str]:
    return {p.strip() for p in text.split(",") if p.strip()}


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT the part's process group (a part's `finally` stops the stack it started), then SIGKILL."""
    for sig, grace in ((signal.SIGINT, STOP_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_part(part: Part, out: Path, env: dict[str, str]) -> dict:
    """Runs one part, its output echoed with a prefix and kept in OUT/<part>.log; its record."""
    command = [sys.executable, "-m", part.module, *part.args]
    record: dict = {"command": " ".join(["python", *command[1:]]), "budget_s": part.budget_s}
    if part.skip:
        print(f"[{part.name}] skipped: {part.skip}", flush=True)
        return {**record, "status": "skipped", "reason": part.skip}
    print(f"[{part.name}] {record['command']}  (budget {part.budget_s:.0f} s)", flush=True)
    log_path = out / f"{part.name}.log"
    part.result.unlink(missing_ok=True)  # an earlier run's numbers must not pass for this one's
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: a timeout stops the stack it started too
        )

        def echo() -> None:
            for line in proc.stdout:
                log.write(line)
                print(f"[{part.name}] {line}", end="", flush=True)

        copier = threading.Thread(target=echo, daemon=True)
        copier.start()
        try:
            code = proc.wait(timeout=part.budget_s)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        copier.join(timeout=5)
    record |= {"seconds": round(time.monotonic() - started, 1), "log": log_path.name}
    if part.result.exists():
        record["result"] = json.loads(part.result.read_text())
    if code is None:
        return {**record, "status": "failed", "reason": f"over its budget of {part.budget_s:.0f} s"}
    if code != 0 or "result" not in record:
        tail = log_path.read_text().strip().splitlines()[-3:]
        why = f"exit status {code}" + ("" if "result" in record else f", no {part.result.name}")
        return {**record, "status": "failed", "reason": f"{why}; last lines: {' | '.join(tail)}"}
    return {**record, "status": "ok"}


def headline(name: str, record: dict) -> str:
    """One line of numbers for a finished part."""
    result = record.get("result")
    if record["status"] != "ok" or result is None:
        return f"{record['status']}: {record.get('reason', '')}"
    if name == "attention":
        worst = max(r["max_abs_err_vs_sdpa"] for r in result["results"])
        speedups = [r["torch_path_ms"] / r["triton_ms"] for r in result["results"] if "torch_path_ms" in r]
        paths = f"; triton vs torch path {min(speedups):.2f}x..{max(speedups):.2f}x" if speedups else ""
        return f"max |triton - torch| {worst:.1e} (all within tolerance: {result['all_ok']}){paths}"
    if name == "decode":
        return "; ".join(
            f"{r['model']} b{r['batch']}: {r['tokens_per_s']:.0f} tok/s"
            + (f" = {r['fraction_of_bound']:.0%} of bound" if "fraction_of_bound" in r else "")
            for r in result["rows"]
        )
    if name == "vs-vllm":
        ratios = result["summary"]["ratios"]
        return (
            "; ".join(
                f"{r['rate']:g} req/s: FastServe/vLLM throughput {r['throughput']:.2f}x, TPOT {r['tpot_mean']:.2f}x"
                for r in ratios
            )
            or "no trace ratios"
        )
    if name == "swap":
        fraction = result["exposed_fraction"]
        shown = f"{fraction:.1%}" if fraction is not None else "n/a (nothing swapped)"
        return f"exposed {result['exposed_seconds']:.3f} s of {result['transfer_seconds']:.3f} s swapping = {shown}"
    burst = result["burst"]
    return (
        f"busy wall {burst['busy_wall_seconds']:.2f} s / worker compute "
        f"{burst['worker_compute_seconds']:.2f} s = {burst['ratio']:.2f}"
    )


def device_info(device: str) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.gpu_suite",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add_flag(
        p,
        "--out",
        default="out/gpu-suite",
        help="folder for the JSON, the plot and each part's log",
        env="OUT",
    )
    add_flag(p, "--device", default="auto", help="auto (cuda when present), cuda, cpu")
    add_flag(
        p, "--smoke", default=False, help="tiny shapes (opt-tiny, a few requests): checks the suite itself"
    )
    add_flag(
        p,
        "--bandwidth-gbs",
        default=0.0,
        help="peak GPU memory bandwidth in GB/s for the decode bound; 0 = from the GPU's name",
    )
    add_flag(p, "--decode-models", default="opt-1.3b,opt-6.7b", help="presets of the decode part")
    add_flag(p, "--swap-model", default="opt-6.7b", help="preset of the swap part")
    add_flag(p, "--live-models", default="opt-tiny,opt-1.3b", help="presets of the live parts, one part each")
    add_flag(
        p,
        "--vllm-python",
        default="",
        help="an interpreter that imports vLLM (CUDA build), for the vs-vllm part",
        env="FASTSERVE_VLLM_PYTHON",
    )
    add_flag(p, "--vs-vllm-rates", default="4,16,64", help="request rates of the vs-vllm part's trace")
    add_flag(
        p,
        "--budgets",
        default="",
        help=f"seconds a part may run, over the defaults {DEFAULT_BUDGETS} (live: each live part), e.g. swap=200",
    )
    add_flag(
        p,
        "--parts",
        default="",
        help="comma list of part names to run (e.g. decode,live-opt-tiny); empty = all but vs-vllm",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info = device_info(args.device if args.device != "auto" else _auto_device())
    parts = plan(args, info["device"], out.resolve())
    if args.parts:
        wanted = csv_names(args.parts)
        parts = [p for p in parts if p.name in wanted]
    print(f"GPU suite on {info.get('gpu', platform.machine())} ({info}); writing {out}/", flush=True)
    # nothing can be downloaded here: a tokenizer lookup fails at once and falls back to bytes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    sections = {part.name: run_part(part, out, env) for part in parts}
    report = {
        "suite": "gpu_suite",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "smoke": args.smoke,
        **info,
        "seconds": round(time.monotonic() - started, 1),
        "sections": sections,
        "failed": [name for name, s in sections.items() if s["status"] == "failed"],
    }
    (out / "gpu_suite.json").write_text(json.dumps(report, indent=2) + "\n")
    from fastserve.bench.gpu_suite_plot import plot_suite

    plot_suite(report, out / "gpu_suite.png")
    print(f"\n=== GPU suite, {info.get('gpu', 'no GPU')}, {report['seconds']:.0f} s ===")
    for name, record in sections.items():
        print(f"{name:<16} {headline(name, record)}")
    print(f"saved {out / 'gpu_suite.json'} and {out / 'gpu_suite.png'}")
    return 1 if report["failed"] else 0


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
