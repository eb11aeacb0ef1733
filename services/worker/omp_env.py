"""The OpenMP environment a CPU worker starts with, set before torch loads OpenMP (which reads it once).

OpenMP's default has every thread spin for a long while after each parallel region; with the
cores shared (the control plane, other ranks, other programs) those threads take the cores the
working threads need: a 2-thread decode step of OPT-125m went from ~25 ms to ~2.5 s on a busy
2-core machine. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) avoids that but wakes a thread
for each of a step's hundreds of parallel regions, 10-30 % of a decode step. So a worker that
adapts its thread count to what the other processes leave free (cpu_share.ThreadGovernor, on by
default) spins briefly (``GOMP_SPINCOUNT``, about 0.1-0.3 ms: the gaps inside a step, not the
wait for the next one); with ``--adaptive-threads false`` it sleeps at once. A value of either
variable already in the environment wins.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

from fastserve.flags import parse_bool

SPIN_COUNT = "30000"


def adaptive_threads(argv: Sequence[str], environ: Mapping[str, str]) -> bool:
    """``--adaptive-threads`` as the worker's parser will read it (flag, else environment, else on)."""
    value = environ.get("FASTSERVE_ADAPTIVE_THREADS", "true")
    for i, arg in enumerate(argv):
        if arg == "--adaptive-threads" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--adaptive-threads="):
            value = arg.partition("=")[2]
    try:
        return parse_bool(value.strip())
    except argparse.ArgumentTypeError:  # the worker's own parser refuses it, with the flag's name
        return True


def openmp_defaults(argv: Sequence[str], environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` (none when the user set the wait policy or spin count)."""
    if "OMP_WAIT_POLICY" in environ or "GOMP_SPINCOUNT" in environ:
        return {}
    if adaptive_threads(argv, environ):
        return {"GOMP_SPINCOUNT": SPIN_COUNT}
    return {"OMP_WAIT_POLICY": "PASSIVE"}
