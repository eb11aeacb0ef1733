"""The OpenMP environment a CPU worker starts with, set before torch loads OpenMP (which reads it once).

OpenMP's default has every thread spin for a long while after each parallel region; with the
cores shared (the control plane, other ranks, other programs) those threads take the cores the
working threads need: a 2-thread decode step of OPT-125m went from ~25 ms to ~2.5 s on a busy
2-core machine. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) avoids that but wakes a thread
for each of a step's hundreds of parallel regions, 10-30 % of a decode step. So a worker that
adapts its thread count to what the other processes leave free (cpu_share.ThreadGovernor, on by
default) spins briefly (``GOMP_SPINCOUNT``, about 0.1-0.3 ms, and ``KMP_BLOCKTIME=1`` ms for
Intel's OpenMP: the gaps inside a step, not the wait for the next one); with
``--adaptive-threads false`` it sleeps at once. A value of any of these variables already in the
environment wins.

The runtime libraries are the other half (``--preload-libs``, as vLLM's CPU docs advise and its
images do): Intel's OpenMP (``libiomp5.so`` from the ``intel-openmp`` wheel) in place of GNU's,
and tcmalloc in place of glibc's allocator, both mapped before torch by ``LD_PRELOAD``. The
dynamic loader reads that only when a process starts, so ``python -m fastserve.services.worker``
starts itself again once with it (`preload_env`). Without tcmalloc on the system, glibc's
allocator is told to keep freed memory (``GLIBC_TUNABLES``) instead of unmapping a step's large
buffers and faulting them in again on the next step.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastserve.flags import env_name, parse_bool

SPIN_COUNT = "30000"
BLOCK_TIME_MS = "1"
INTEL_OPENMP = "libiomp5.so"  # where the intel-openmp wheel puts it: <sys.prefix>/lib
TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")  # Debian/Ubuntu libtcmalloc-minimal4, gperftools
LIB_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
# glibc keeps up to 256 MiB blocks on its heap and 512 MiB free at its top instead of returning them
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=536870912"
# set in the started-again process: it never starts itself a third time
PRELOADED = "FASTSERVE_WORKER_PRELOADED"


def flag_value(argv: Sequence[str], environ: Mapping[str, str], flag: str, default: str) -> str:
    """A worker flag's value as its parser will read it: the flag, else its environment variable, else `default`."""
    value = environ.get(env_name(flag), default)
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.partition("=")[2]
    return value.strip()


def adaptive_threads(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """``--adaptive-threads`` as the worker's parser will read it (flag, else environment, else on)."""
    try:
        return parse_bool(flag_value(argv, environ, "--adaptive-threads", "true"))
    except argparse.ArgumentTypeError:  # the worker's own parser refuses it, with the flag's name
        return True


def openmp_defaults(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` (none when the user set the wait policy or spin time):
    the brief spin for GNU's OpenMP (``GOMP_SPINCOUNT``) and for Intel's (``KMP_BLOCKTIME``, ms; its
    default, 200 ms, would spin through the wait for the next step too)."""
    if any(name in environ for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
        return {}
    if adaptive_threads(argv, environ):
        return {"GOMP_SPINCOUNT": SPIN_COUNT, "KMP_BLOCKTIME": BLOCK_TIME_MS}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


def runtime_libraries(setting: str, prefix: str, lib_dirs: Sequence[str] = LIB_DIRS) -> list[str]:
    """``--preload-libs`` resolved: "auto" = the venv's Intel OpenMP and the system's tcmalloc, those
    found; "none"; or a colon-separated list, each of which must exist."""
    if setting == "none":
        return []
    if setting != "auto":
        paths = [part for part in setting.split(":") if part]
        missing = [path for path in paths if not Path(path).is_file()]
        if missing:
            raise SystemExit(f"--preload-libs: no such library: {', '.join(missing)}")
        return paths
    openmp = Path(prefix) / "lib" / INTEL_OPENMP
    tcmalloc = [Path(d) / n for n in TCMALLOC for d in lib_dirs if (Path(d) / n).is_file()]
    return [str(path) for path in [openmp, *tcmalloc[:1]] if path.is_file()]


def preload_env(
    argv: Sequence[str], environ: Mapping[str, str], prefix: str, lib_dirs: Sequence[str] = LIB_DIRS
) -> dict[str, str]:
    """The variables a CPU worker must start again with so `--preload-libs` is mapped before torch;
    {} when there is nothing to change (already started again, on CUDA, or all of it preloaded)."""
    if environ.get(PRELOADED) or flag_value(argv, environ, "--device", "auto") == "cuda":
        return {}
    setting = flag_value(argv, environ, "--preload-libs", "auto")
    libs = runtime_libraries(setting, prefix, lib_dirs)
    current = environ.get("LD_PRELOAD", "").replace(" ", ":").split(":")
    new = [lib for lib in libs if lib not in current]
    changes = {}
    if new:
        changes["LD_PRELOAD"] = ":".join([*new, *(part for part in current if part)])
    tcmalloc = any(Path(lib).name in TCMALLOC for lib in libs)
    if setting == "auto" and not tcmalloc and "GLIBC_TUNABLES" not in environ:
        changes["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    return {**changes, PRELOADED: "1"} if changes else {}
