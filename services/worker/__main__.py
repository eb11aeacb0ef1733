"""``python -m fastserve.services.worker``.

OpenMP reads its wait policy once, when torch loads it, so it is set here, before the import
(see omp_env.py for what and why).
"""

import os
import sys

from .omp_env import openmp_defaults

os.environ.update(openmp_defaults(sys.argv[1:], os.environ))

from .server import main  # noqa: E402 - after the wait policy, which torch's OpenMP reads at load

sys.exit(main())
