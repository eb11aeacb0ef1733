"""``python -m fastserve.services.worker``.

OpenMP reads its wait policy once, when torch loads it, and the dynamic loader reads
``LD_PRELOAD`` once, when the process starts: so the wait policy is set here, before the import,
and a CPU worker starts itself again, once, with its runtime libraries preloaded (see omp_env.py
for what and why).
"""

import os
import sys

from .omp_env import openmp_defaults, preload_env

if changes := preload_env(sys.argv[1:], os.environ, sys.prefix):
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **changes})

os.environ.update(openmp_defaults(sys.argv[1:], os.environ))

from .server import main  # noqa: E402 - after the wait policy, which torch's OpenMP reads at load

sys.exit(main())
