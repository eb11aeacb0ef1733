"""fastserve.bench.worker_step end to end on the tiny model: both paths run, agree, and the JSON says so."""

from __future__ import annotations

import json

from fastserve.bench import worker_step


def test_worker_step_bench_times_both_paths_and_saves_json(tmp_path):
    out = tmp_path / "ws.json"
    argv = ["--model", "opt-tiny", "--batch-sizes", "1,3", "--contexts", "8", "--steps", "2"]
    assert worker_step.main([*argv, "--prefill-tokens", "5", "--busy-cores", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(r["batch"], r["context"]) for r in result["rows"]] == [(1, 8), (3, 8)]
    for row in result["rows"]:
        assert row["greedy_tokens_agree"]
        for phase in ("decode", "mixed"):
            assert row[phase]["samples"] == 2 and row[phase]["eager_ms"] > 0 and row[phase]["fast_ms"] > 0
    assert result["busy_cores"] == 1 and result["omp_wait_policy"]
