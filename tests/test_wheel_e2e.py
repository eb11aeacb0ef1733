"""The wheel adds one top-level name to site-packages: `fastserve` (services and bench live under it)."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from fastserve.protogen import ROOT


def test_the_built_wheel_has_fastserve_as_its_only_top_level_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = tmp_path.glob("fastserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastserve"}, top
    for module in ("services/gateway/server.py", "services/scheduler/policy/mlfq.py", "bench/load.py"):
        assert f"fastserve/{module}" in names, module
