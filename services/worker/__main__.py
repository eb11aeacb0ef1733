"""``python -m fastserve.services.worker``.

OpenMP reads its wait policy once, when torch loads it, so it is set here, before the import.
Its default has every thread spin for a while after each parallel region; when the cores are
shared (the control plane, other ranks, other programs) those spinning threads take the
cores the threads doing the work need: a decode step of OPT-125m on 2 threads went from
~25 ms to ~2.5 s on a busy 2-core machine. PASSIVE threads sleep instead. An explicit
OMP_WAIT_POLICY in the environment wins.
"""

import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .server import main  # noqa: E402 - after the wait policy, which torch's OpenMP reads at load

sys.exit(main())
