"""The requirements the GPU suite's wheel folder must satisfy, one a line, read from pyproject.toml:
the project's build requirements and dependencies, less what the GPU machine brings itself.

    python -m fastserve.bench.gpu_wheels > requirements.txt    (bench/gpu_suite.sh --prepare-wheels runs this)

It reads the file with tomllib, so the machine that prepares the folder needs Python 3.11+ (the
folder itself can target another version: --python-version).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
MACHINE_PROVIDES = {"torch", "triton"}  # installed on the GPU machine, built for its CUDA


def requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """build-system.requires + project.dependencies, without MACHINE_PROVIDES."""
    data = tomllib.loads(pyproject.read_text())
    wanted = data["build-system"]["requires"] + data["project"]["dependencies"]
    return [r for r in wanted if re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() not in MACHINE_PROVIDES]


if __name__ == "__main__":
    sys.stdout.write("".join(f"{r}\n" for r in requirements()))
