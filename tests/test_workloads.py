"""Workloads: synthetic length distributions, arrivals, JSONL traces, real dataset files."""

from __future__ import annotations

import json
import statistics

import pytest

from fastserve.bench.workloads import (
    MAX_INPUT,
    MAX_TOTAL,
    arrivals,
    load_dataset,
    load_jsonl,
    load_trace,
    main,
    synthetic_lengths,
    write_jsonl,
)


@pytest.mark.parametrize("name, mean_in, mean_out", [("sharegpt", 161, 338), ("alpaca", 19, 58)])
def test_synthetic_lengths_match_published_means_with_a_heavy_tail(name, mean_in, mean_out):
    lengths = synthetic_lengths(name, 50000, seed=0)
    ins, outs = [i for i, _ in lengths], [o for _, o in lengths]
    assert statistics.mean(ins) == pytest.approx(mean_in, rel=0.03)
    assert statistics.mean(outs) == pytest.approx(mean_out, rel=0.03)
    # right-skewed: most requests are short, a few are long
    assert statistics.median(outs) < 0.8 * statistics.mean(outs)
    assert max(outs) > 4 * mean_out
    # the artifact's filters
    assert max(ins) <= MAX_INPUT and max(i + o for i, o in lengths) <= MAX_TOTAL
    assert not any(i < 4 and o < 4 for i, o in lengths) and min(ins + outs) >= 1


def test_synthetic_lengths_are_reproducible_and_unknown_names_refused():
    assert synthetic_lengths("alpaca", 100, 3) == synthetic_lengths("alpaca", 100, 3)
    assert synthetic_lengths("alpaca", 100, 3) != synthetic_lengths("alpaca", 100, 4)
    with pytest.raises(ValueError, match="sharegpt, alpaca, summarize, sharegpt-real"):
        synthetic_lengths("lmsys", 10, 0)


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_arrivals_have_the_requested_rate_and_cv(cv):
    times = arrivals(40000, rate=4.0, cv=cv, seed=0)
    gaps = [b - a for a, b in zip([0.0, *times], times, strict=False)]
    assert statistics.mean(gaps) == pytest.approx(0.25, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(cv, rel=0.06)
    assert times == sorted(times)


def test_bad_rate_is_refused():
    with pytest.raises(ValueError, match="rate"):
        arrivals(10, rate=0.0, cv=1.0, seed=0)


def test_jsonl_trace_keeps_given_arrivals_and_fills_the_rest(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(
        '{"arrival_time": 5.0, "input_len": 10, "output_len": 3}\n\n{"input_len": 7, "output_len": 2}\n'
    )
    assert load_jsonl(str(path)) == [(5.0, 10, 3), (None, 7, 2)]
    trace = load_trace(str(path), num_requests=10, rate=100.0)
    assert len(trace) == 2 and trace[-1] == (5.0, 10, 3) and trace[0][1:] == (7, 2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_len": 7}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: missing output_len"):
        load_jsonl(str(bad))


def test_write_jsonl_round_trips(tmp_path):
    path = tmp_path / "w.jsonl"
    write_jsonl([(0.5, 3, 4), (None, 5, 6)], str(path))
    assert load_jsonl(str(path)) == [(0.5, 3, 4), (None, 5, 6)]


def dataset(tmp_path):
    data = [
        {"conversations": [{"from": "human", "value": "a b c d e"}, {"from": "gpt", "value": "x y"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},  # both < 4
        {"conversations": [{"from": "human", "value": "w " * 1100}, {"from": "gpt", "value": "y"}]},  # > 1024
        {"conversations": [{"from": "human", "value": "w " * 1000}, {"from": "gpt", "value": "y " * 1100}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
        {"conversations": [{"from": "gpt", "value": "a b c d"}, {"from": "human", "value": "e f g h"}]},
        {"instruction": "one two", "input": "three", "output": "four five six seven eight"},
        {"instruction": "one two three four", "input": "", "output": "ok"},
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(data))
    return path


def test_dataset_loader_applies_the_artifact_filters(tmp_path):
    # kept: the first pair, both alpaca items (prompt = instruction + input); dropped: both-short,
    # prompt > 1024, prompt + output > 2048, a lone turn, a conversation the model opens
    assert load_dataset(str(dataset(tmp_path)), str.split) == [(5, 2), (3, 5), (4, 1)]


def test_dataset_to_jsonl_cli(tmp_path, capsys):
    out = tmp_path / "trace.jsonl"
    assert main(["--dataset", str(dataset(tmp_path)), "--out", str(out), "--rate", "2"]) == 0
    rows = load_jsonl(str(out))
    assert [(i, o) for _, i, o in rows] == [(5, 2), (3, 5), (4, 1)]
    assert all(a is not None for a, _, _ in rows)
    assert "3 requests" in capsys.readouterr().out


def test_dataset_to_jsonl_cli_clips_lengths(tmp_path):
    out = tmp_path / "trace.jsonl"
    argv = ["--dataset", str(dataset(tmp_path)), "--out", str(out), "--max-input-len", "4"]
    assert main([*argv, "--max-output-len", "2"]) == 0
    assert [(i, o) for _, i, o in load_jsonl(str(out))] == [(4, 2), (3, 2), (4, 1)]


def test_summarize_workload_is_long_prompts_short_outputs(capsys):
    lengths = synthetic_lengths("summarize", 20000, seed=0)
    assert statistics.mean(i for i, _ in lengths) == pytest.approx(780, rel=0.03)
    assert statistics.mean(o for _, o in lengths) == pytest.approx(60, rel=0.03)
    assert main(["--stats", "summarize,alpaca", "--num-requests", "2000"]) == 0
    table = capsys.readouterr().out
    assert "summarize" in table and "alpaca" in table
