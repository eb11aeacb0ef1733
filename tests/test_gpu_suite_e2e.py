"""The GPU suite does not rot: its driver, at tiny shapes on the CPU, runs every part (the
Triton part needs CUDA) and saves one JSON with every section and one plot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_smoke_run_writes_every_section(tmp_path):
    out = tmp_path / "suite"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastserve.bench.gpu_suite",
            "--device",
            "cpu",
            "--smoke",
            "--bandwidth-gbs",
            "20",
        ]
        + ["--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_suite.json").read_text())
    sections = report["sections"]
    assert list(sections) == ["attention", "decode", "swap", "live-opt-tiny"]
    assert sections["attention"]["status"] == ("ok" if torch.cuda.is_available() else "skipped")
    for name in ("decode", "swap", "live-opt-tiny"):
        assert sections[name]["status"] == "ok", sections[name]
        assert (out / sections[name]["log"]).exists()
    decode = sections["decode"]["result"]["rows"]
    assert [r["batch"] for r in decode] == [1, 4] and all(0 < r["fraction_of_bound"] for r in decode)
    assert sections["swap"]["result"]["transfer_seconds"] > 0  # the smoke load does swap
    assert sections["live-opt-tiny"]["result"]["burst"]["ratio"] > 0
    assert report["failed"] == [] and (out / "gpu_suite.png").stat().st_size > 0
    assert "=== GPU suite" in proc.stdout
