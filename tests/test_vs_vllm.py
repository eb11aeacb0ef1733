"""fastserve.bench.vs_vllm without vLLM: its flags, the commands it builds, how it reads `vllm bench serve`
files and its own runs, the greedy check, where vLLM queues, the tables and the plot."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from fastserve.bench import vllm_cpu, vs_vllm
from fastserve.bench.vs_vllm_report import (
    FASTSERVE,
    VLLM,
    adopt_vllm_results,
    busy_fall,
    compare_greedy,
    decode_step,
    parse_vllm_bench,
    plot,
    queue_rate,
    ratios,
    step_table,
    trace_means,
    trace_settings,
    trace_table,
    worker_metrics_address,
)

# the keys `vllm bench serve --save-result --percentile-metrics ttft,tpot,itl,e2el
# --metric-percentiles 50,99` writes (vllm-cpu 0.32.0), lists cut short
VLLM_BENCH_FILE = {
    "date": "20261206-020000",
    "backend": "vllm",
    "num_prompts": 4,
    "request_rate": "inf",
    "max_concurrency": 4,
    "duration": 2.5,
    "completed": 4,
    "failed": 0,
    "total_input_tokens": 516,
    "total_output_tokens": 128,
    "request_throughput": 1.6,
    "output_throughput": 51.2,
    "mean_ttft_ms": 400.0,
    "median_ttft_ms": 390.0,
    "p50_ttft_ms": 390.0,
    "p99_ttft_ms": 450.0,
    "mean_tpot_ms": 31.5,
    "median_tpot_ms": 31.0,
    "p99_tpot_ms": 33.0,
    "mean_itl_ms": 31.4,
    "median_itl_ms": 30.2,
    "p99_itl_ms": 40.0,
    "mean_e2el_ms": 1400.0,
    "median_e2el_ms": 1390.0,
    "p99_e2el_ms": 1500.0,
    "ttfts": [0.4, 0.39],
}


def run(server: str, rate: float, tok_s: float, ttft_p99: float, **overrides) -> dict:
    """A `fastserve bench` result with the fields the report reads (seconds)."""
    return {
        "server": server,
        "rate": rate,
        "output_throughput": tok_s,
        "ttft": {"mean": overrides.get("ttft_mean", ttft_p99 / 2), "p99": ttft_p99},
        "tpot": {"mean": overrides.get("tpot", 0.03)},
        "jct": {"mean": 2.0},
        "latency_per_token": {"p99": overrides.get("lpt_p99", 0.1)},
    }


def test_a_vllm_bench_file_reads_into_milliseconds_and_counts():
    parsed = parse_vllm_bench(VLLM_BENCH_FILE)
    assert parsed["completed"] == 4 and parsed["failed"] == 0 and parsed["max_concurrency"] == 4
    assert parsed["output_throughput"] == 51.2 and parsed["total_output_tokens"] == 128
    assert parsed["itl"] == {"mean": 31.4, "median": 30.2, "p99": 40.0}
    assert parsed["e2el"]["p99"] == 1500.0 and parsed["ttft"]["median"] == 390.0
    without_e2el = {k: v for k, v in VLLM_BENCH_FILE.items() if "e2el" not in k}
    assert math.isnan(parse_vllm_bench(without_e2el)["e2el"]["mean"])


def test_greedy_outputs_agree_only_with_the_same_tokens_and_close_logprobs():
    a = [{"tokens": ["t5", "t9", "t7"], "logprobs": [-0.1, -0.2, -0.3]}]
    same = [{"tokens": ["t5", "t9", "t7"], "logprobs": [-0.1 + 2e-6, -0.2, -0.3 - 1e-6]}]
    result = compare_greedy(a, same, tolerance=1e-4)
    assert result["ok"] and result["identical_tokens"] and result["max_logprob_diff"] == pytest.approx(2e-6)
    assert result["first_difference"] == [None]

    differs = [{"tokens": ["t5", "t8", "t1"], "logprobs": [-0.1, -5.0, -9.0]}]
    result = compare_greedy(a, differs, tolerance=1e-4)
    assert not result["ok"] and result["first_difference"] == [1]
    assert result["max_logprob_diff"] == pytest.approx(0.0)  # only the shared prefix is compared

    far = [{"tokens": ["t5", "t9", "t7"], "logprobs": [-0.1, -0.25, -0.3]}]
    assert not compare_greedy(a, far, tolerance=1e-4)["ok"]


def test_vllm_queues_where_its_p99_ttft_passes_three_times_the_lowest_rates():
    results = [
        run(VLLM, 1, 60, 0.4),
        run(VLLM, 3, 170, 0.9),
        run(VLLM, 8, 250, 2.0),
        run(FASTSERVE, 8, 90, 0.1),
    ]
    assert queue_rate(results) == 8
    assert queue_rate(results[:2]) is None
    assert queue_rate([results[0]]) is None


def test_ratios_pair_the_two_servers_at_each_rate():
    results = [
        run(VLLM, 3, 200, 0.4, tpot=0.04, lpt_p99=0.2),
        run(FASTSERVE, 3, 100, 0.8, tpot=0.08, lpt_p99=0.1),
        run(VLLM, 1, 60, 0.4),
    ]
    (row,) = ratios(results)  # rate 1 has no FastServe run
    assert row["rate"] == 3 and row["throughput"] == 0.5 and row["ttft_mean"] == 2.0
    assert row["tpot_mean"] == 2.0 and row["latency_per_token_p99"] == 0.5


def test_busy_fall_compares_each_server_with_its_quiet_run_at_the_same_rate():
    quiet = [run(VLLM, 8, 200, 1), run(FASTSERVE, 8, 100, 1), run(VLLM, 3, 150, 1)]
    busy = [run(VLLM, 8, 150, 1), run(FASTSERVE, 8, 90, 1), run(FASTSERVE, 5, 1, 1)]
    rows = busy_fall(quiet, busy)
    assert [(r["server"], r["fall"]) for r in rows] == [(VLLM, 0.25), (FASTSERVE, pytest.approx(0.1))]
    # the busy part's own quiet run, just before, wins over the trace's
    own = [{**run(FASTSERVE, 8, 90, 1), "quiet_output_throughput": 180.0}]
    assert busy_fall(quiet, own)[0]["fall"] == pytest.approx(0.5)


def test_the_servers_take_turns_one_switch_per_measurement():
    plan = vs_vllm.segments(["greedy", "trace", "step", "busy"], [1.0, 3.0])
    assert plan == [("greedy", None), ("trace", 1.0), ("trace", 3.0), ("step", None), ("busy", None)]
    order = [name for i in range(len(plan)) for name in vs_vllm.turn_order([VLLM, FASTSERVE], i)]
    assert order[:4] == [VLLM, FASTSERVE, FASTSERVE, VLLM]
    switches = sum(a != b for a, b in zip(order, order[1:], strict=False))
    assert switches == len(plan)  # one inside each measurement, none between two
    assert vs_vllm.turn_order([FASTSERVE], 3) == [FASTSERVE]


def test_each_trace_rate_runs_on_each_server_as_often_as_asked_the_first_server_alternating():
    plan = vs_vllm.segments(["greedy", "trace"], [1.0, 3.0], trace_runs=2)
    assert plan == [("greedy", None), ("trace", 1.0), ("trace", 1.0), ("trace", 3.0), ("trace", 3.0)]
    firsts = [
        vs_vllm.turn_order([VLLM, FASTSERVE], i)[0] for i, (part, _) in enumerate(plan) if part == "trace"
    ]
    assert firsts == [FASTSERVE, VLLM, FASTSERVE, VLLM]  # each rate: once first, once second


def test_the_tables_show_the_mean_of_each_servers_runs_at_a_rate():
    runs = [
        run(VLLM, 1, 60, 0.4, tpot=0.030),
        run(FASTSERVE, 1, 50, 0.5, tpot=0.040),
        run(FASTSERVE, 1, 70, 0.7, tpot=0.020),
        run(VLLM, 1, 60, 0.2, tpot=0.034),
        run(VLLM, 3, 150, 0.9),
    ]
    means = {(r["server"], r["rate"]): r for r in trace_means(runs)}
    assert len(means) == 3 and means[(VLLM, 3)]["runs"] == 1 and means[(VLLM, 3)]["output_throughput"] == 150
    fs, vl = means[(FASTSERVE, 1)], means[(VLLM, 1)]
    assert (fs["runs"], fs["server"], fs["rate"]) == (2, FASTSERVE, 1)
    assert fs["output_throughput"] == 60 and math.isclose(fs["ttft"]["p99"], 0.6)
    assert math.isclose(vl["tpot"]["mean"], 0.032) and vl["output_throughput"] == 60
    (pair,) = [r for r in ratios(trace_means(runs), runs) if r["rate"] == 1]
    assert math.isclose(pair["tpot_mean"], 0.030 / 0.032)
    assert [round(x, 3) for x in pair["tpot_mean_runs"]] == [round(0.040 / 0.030, 3), round(0.020 / 0.034, 3)]
    assert all("tpot_mean_runs" not in r for r in ratios(trace_means(runs)))  # one run or none given


def test_the_top_rate_doubles_after_its_measurement_while_vllm_does_not_queue():
    plan = vs_vllm.segments(["trace", "busy"], [1.0, 8.0])
    report = {"trace": [run(VLLM, 1, 60, 0.4), run(FASTSERVE, 1, 60, 0.4)]}
    assert vs_vllm.extra_rate(report, plan, 0, [1.0, 8.0], 2) is None  # not the last trace rate
    report["trace"] += [run(VLLM, 8, 200, 0.5), run(FASTSERVE, 8, 200, 0.5)]
    assert vs_vllm.extra_rate(report, plan, 1, [1.0, 8.0], 2) == 16.0
    assert vs_vllm.extra_rate(report, plan, 1, [1.0, 8.0], 0) is None  # no doublings left
    report["trace"][2] = run(VLLM, 8, 200, 1.3)  # P99 TTFT over 3x the lowest rate's: it queues
    assert vs_vllm.extra_rate(report, plan, 1, [1.0, 8.0], 2) is None
    alone = {"trace": [run(FASTSERVE, 1, 60, 0.4), run(FASTSERVE, 8, 60, 0.4)]}
    assert vs_vllm.extra_rate(alone, plan, 1, [1.0, 8.0], 2) is None  # no vLLM measured


def test_a_server_started_again_reads_only_its_own_start_of_the_log(tmp_path, monkeypatch):
    import sys

    monkeypatch.setattr(vs_vllm, "wait_http", lambda *args: None)
    log = tmp_path / "log"
    for word in ("first", "second"):
        cmd = [sys.executable, "-c", f"print('{word}', flush=True); import time; time.sleep(2)"]
        with vs_vllm.Server("x", cmd, dict(os.environ), 1, log) as server:
            server.proc.wait()
            assert server.output() == f"{word}\n"
    assert log.read_text() == "first\nsecond\n"


def test_tables_and_plot(tmp_path):
    results = [run(VLLM, 1, 63.9, 0.396), run(FASTSERVE, 1, 58.9, 0.758), run(VLLM, 3, 177.7, 0.289)]
    text = trace_table(results)
    assert "| 1 req/s | vLLM-CPU | 63.9 | 198 / 396 |" in text and "| 3 req/s | FastServe" not in text
    step = {
        VLLM: [{"batch": 4, "context": 128, "itl": {"median": 0.0}, "tpot": {"median": 20.0}}],
        FASTSERVE: [
            {
                "batch": 4,
                "context": 128,
                "itl": {"median": 29.0},
                "tpot": {"median": 30.0},
                "worker_step_ms": 22.0,
            }
        ],
    }
    assert "| 4 / 128 | 20.0 / 0.0 | 30.0 / 29.0 | 1.50x | 22.0 | 1.10x |" in step_table(step)
    plot(results, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000


def test_flags_are_checked_before_anything_is_built():
    parse = vs_vllm.build_parser().parse_args
    vs_vllm.check_args(parse([]))
    for bad, message in (
        (["--parts", "trace,warp"], "--parts: unknown warp"),
        (["--servers", "sglang"], "--servers: unknown sglang"),
        (["--rates", "1,0"], "--rates"),
        (["--threads", "0"], "--threads"),
        (["--step-batches", "1,0"], "--step-batches"),
        (["--trace-runs", "0"], "--trace-runs"),
    ):
        with pytest.raises(SystemExit, match=message):
            vs_vllm.check_args(parse(bad))


def test_the_trace_and_vllm_bench_commands(tmp_path):
    args = vs_vllm.build_parser().parse_args(["--rates", "1,3"])
    argv = vs_vllm.trace_argv(args, 3.0)
    flags = dict(zip(argv[::2], argv[1::2], strict=True))
    assert flags == {
        "--backend": "openai",
        "--workload": "sharegpt",
        "--num-requests": "48",
        "--max-input-len": "256",
        "--max-output-len": "64",
        "--seed": "0",
        "--rate": "3",
        "--vocab-size": "50272",
    }
    server = vs_vllm.Server("x", [], {}, 22001, tmp_path / "log")
    argv = vs_vllm.vllm_bench_argv(
        server, "/ckpt", tmp_path, "step_b4", input_len=512, output_len=32, prompts=4
    )
    assert argv[:2] == ["bench", "serve"] and "--ignore-eos" in argv and "--save-result" in argv
    after = {flag: argv[i + 1] for i, flag in enumerate(argv[:-1]) if flag.startswith("--")}
    assert after["--base-url"] == "http://127.0.0.1:22001" and after["--random-input-len"] == "512"
    assert after["--result-filename"] == "step_b4.json" and after["--tokenizer"] == "/ckpt"


def test_both_servers_get_the_same_thread_budget(tmp_path):
    args = vs_vllm.build_parser().parse_args(
        ["--threads", "1", "--tcmalloc", "/lib/tc.so", "--iomp", "/lib/iomp.so"]
    )
    commands = vs_vllm.server_commands(args, "/ckpt", ["python", "vllm-cli"], 22001)
    vllm_cmd, vllm_env = commands[VLLM]
    fs_cmd, fs_env = commands[FASTSERVE]
    assert vllm_env["OMP_NUM_THREADS"] == fs_env["OMP_NUM_THREADS"] == "1"
    assert fs_cmd[fs_cmd.index("--num-threads") + 1] == "1"
    assert vllm_env["VLLM_CPU_OMP_THREADS_BIND"] == str(min(os.sched_getaffinity(0)))
    assert (
        vllm_env["LD_PRELOAD"].startswith("/lib/tc.so:/lib/iomp.so")
        and vllm_env["VLLM_TARGET_DEVICE"] == "cpu"
    )
    assert "--no-enable-prefix-caching" in vllm_cmd  # FastServe has none; the runs repeat their prompts
    assert "--dtype" in vllm_cmd and vllm_cmd[vllm_cmd.index("--dtype") + 1] == "float32"
    assert vllm_cmd[vllm_cmd.index("--port") + 1] == fs_cmd[fs_cmd.index("--http-port") + 1] == "22001"
    run = vs_vllm.Comparison(args, commands, {}, [1.0], [], "/ckpt", tmp_path, {})
    grpc_port = fs_cmd[fs_cmd.index("--port") + 1]  # the trace reads FastServe's per-request counts there
    assert grpc_port != "22001"
    assert vs_vllm.counts_flags(run, FASTSERVE) == ["--address", f"127.0.0.1:{grpc_port}"]
    assert vs_vllm.counts_flags(run, VLLM) == []


def test_vllm_env_binding_and_tcmalloc_choices():
    assert vllm_cpu.server_env(2, 1, "nobind", [])["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"
    assert vllm_cpu.find_iomp(Path("/nowhere")) == "" and vllm_cpu.find_iomp(Path("/x"), "none") == ""
    assert vllm_cpu.find_tcmalloc("none") == ""
    assert vllm_cpu.find_tcmalloc("/x.so") == "/x.so"


def test_the_wrapper_answers_vllms_version_question_with_vllm_cpus(tmp_path, monkeypatch):
    """The wrapper, imported (not run), patches importlib.metadata.version and starts nothing."""
    import importlib.metadata

    real = importlib.metadata.version

    def installed(name: str) -> str:
        if name == "vllm":
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.32.0" if name == "vllm-cpu" else real(name)

    monkeypatch.setattr(importlib.metadata, "version", installed)
    path = tmp_path / "vllm_cli.py"
    path.write_text(vllm_cpu.WRAPPER)
    namespace: dict = {"__name__": "not_main"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    assert importlib.metadata.version("vllm") == "0.32.0+cpu"
    assert importlib.metadata.version("pytest") == real("pytest")


def test_the_gpu_suite_runs_vs_vllm_only_when_named_and_skips_it_without_vllm(tmp_path):
    from fastserve.bench import gpu_suite

    parse = gpu_suite.build_parser().parse_args
    assert "vs-vllm" not in [p.name for p in gpu_suite.plan(parse([]), "cuda", tmp_path)]
    (part,) = [
        p for p in gpu_suite.plan(parse(["--parts", "vs-vllm"]), "cuda", tmp_path) if p.name == "vs-vllm"
    ]
    assert part.skip.startswith("no vLLM")
    named = parse(["--parts", "vs-vllm", "--vllm-python", "/opt/vllm/bin/python"])
    (part,) = [p for p in gpu_suite.plan(named, "cuda", tmp_path) if p.name == "vs-vllm"]
    assert not part.skip and part.result == tmp_path / "vs-vllm" / "vs_vllm.json"
    args = vs_vllm.build_parser().parse_args(part.args)  # the part's flags are fastserve.bench.vs_vllm's
    vs_vllm.check_args(args)
    assert args.device == "cuda" and args.vllm_python == "/opt/vllm/bin/python" and args.rates == "4,16,64"


def test_a_rerun_takes_vllms_results_from_an_earlier_run_with_the_same_trace():
    args = vs_vllm.build_parser().parse_args([])
    settings = trace_settings(vs_vllm.trace_argv(args, 0))
    assert "--rate" not in settings and settings[:2] == ["--backend", "openai"]
    command = "fastserve bench " + " ".join(
        [*vs_vllm.trace_argv(args, 8), "--base-url", "http://127.0.0.1:1", "--label", VLLM]
    )
    previous = {
        "date": "d",
        "command": "python -m fastserve.bench.vs_vllm",
        "greedy": {VLLM: [{"tokens": ["t5"], "logprobs": [-1.0]}]},
        "trace": [{**run(VLLM, r, 100, 1), "command": command} for r in (1, 3, 8, 16)]
        + [{**run(FASTSERVE, 1, 50, 1), "command": command}],
        "busy": [run(VLLM, 16, 80, 1)],
        "anchor": {VLLM: {"output_throughput": 1.0}},
        "step": {VLLM: [], FASTSERVE: []},
    }
    report = {
        "trace_settings": settings,
        "greedy": {},
        "trace": [],
        "trace_runs": [],
        "busy": [],
        "anchor": {},
        "step": {},
    }
    assert adopt_vllm_results(report, previous) == [1, 3, 8, 16]
    assert {r["server"] for r in report["trace"]} == {VLLM} and len(report["trace"]) == 4
    assert VLLM in report["greedy"] and report["step"] == {VLLM: []} and len(report["busy"]) == 1
    previous["trace_runs"] = [{**run(VLLM, 1, tok_s, 1), "command": command} for tok_s in (90, 110)]
    report |= {"trace": [], "trace_runs": []}
    adopt_vllm_results(report, previous)  # a newer file: every run is taken, the table shows their mean
    assert len(report["trace_runs"]) == 2 and report["trace"][0]["output_throughput"] == 100
    other = vs_vllm.build_parser().parse_args(["--num-requests", "96"])
    report = {"trace_settings": trace_settings(vs_vllm.trace_argv(other, 0))}
    with pytest.raises(SystemExit, match="is not this run's"):
        adopt_vllm_results(report, previous)


def test_a_server_that_asks_for_an_api_key_is_up():
    import http.server
    import subprocess
    import sys
    import threading

    from fastserve.bench.vs_transformers import wait_http

    class AskForKey(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), AskForKey)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        wait_http(f"http://127.0.0.1:{httpd.server_port}/v1/models", proc, 60)
    finally:
        proc.kill()
        proc.wait()
        httpd.shutdown()
        httpd.server_close()


def test_a_server_that_never_comes_up_is_stopped(tmp_path, monkeypatch):
    import sys

    def interrupted(*args) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(vs_vllm, "wait_http", interrupted)
    server = vs_vllm.Server(
        "x", [sys.executable, "-c", "import time; time.sleep(120)"], dict(os.environ), 1, tmp_path / "log"
    )
    with pytest.raises(KeyboardInterrupt):
        server.__enter__()
    assert server.proc is not None and server.proc.poll() is not None


def test_worker_step_from_up_output_and_metrics():
    out = (
        "FastServe is up: gateway on 127.0.0.1:1 and http://127.0.0.1:2/v1 (model m, ...)\n"
        "Prometheus metrics: scheduler http://127.0.0.1:3/metrics, worker0 http://127.0.0.1:4/metrics, "
        "worker1 http://127.0.0.1:5/metrics\n"
    )
    assert worker_metrics_address(out) == "127.0.0.1:4"
    assert worker_metrics_address("FastServe is up: gateway on 127.0.0.1:1\n") is None
    name = "fastserve:worker_decode_step_seconds"
    before = {f"{name}_count": 3.0, f"{name}_sum": 0.075, 'fastserve:worker_kv_blocks{tier="gpu"}': 8.0}
    after = {f"{name}_count": 10.0, f"{name}_sum": 0.25}
    assert decode_step(before, after) == (pytest.approx(25.0), 7.0)
    assert decode_step(after, after) == (None, 0.0)


IDLE_SERVER = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'{}')\n"
    "    def log_message(self, *a):\n"
    "        pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)


@pytest.mark.parametrize("both_up", [False, True])
def test_turns_restart_servers_one_at_a_time_or_keep_both_up(tmp_path, monkeypatch, both_up):
    """Two real processes answering /v1/models stand in for the servers; the measurement itself is
    recorded instead of run. One at a time, every switch stops one server and starts the other;
    with --both-up each starts once, and the one not measuring is seen idle (its CPU time per turn)."""
    from fastserve.procs import free_ports

    flags = ["--parts", "greedy,trace", "--rates", "1", "--trace-runs", "3", "--warmup-requests", "0"]
    args = vs_vllm.build_parser().parse_args([*flags, "--both-up", str(both_up).lower()])
    ports = dict(zip((VLLM, FASTSERVE), free_ports(2) if both_up else [free_ports(1)[0]] * 2, strict=True))
    commands = {
        name: ([os.sys.executable, "-c", IDLE_SERVER, str(port)], dict(os.environ))
        for name, port in ports.items()
    }
    measured = []

    def measure(server, part, rate, run):
        assert server.proc.poll() is None
        measured.append((server.name, server.proc.pid, part))

    monkeypatch.setattr(vs_vllm, "run_segment", measure)
    report: dict = {"trace": []}
    run = vs_vllm.Comparison(args, commands, ports, [1.0], [], "/ckpt", tmp_path, report)
    vs_vllm.run_in_turns([VLLM, FASTSERVE], run)

    # greedy, trace x3 on each, the first to measure alternating: V F F V V F F V
    assert [name for name, _, _ in measured] == [VLLM, FASTSERVE, FASTSERVE, VLLM] * 2
    starts = {name: len(report["start_seconds"][name]) for name in ports}
    pids = {name: {pid for n, pid, _ in measured if n == name} for name in ports}
    if both_up:
        assert starts == {VLLM: 1, FASTSERVE: 1} and all(len(p) == 1 for p in pids.values())
        idle = report["idle_cpu_seconds"]  # FastServe starts after vLLM's first turn
        assert (len(idle[VLLM]), len(idle[FASTSERVE])) == (4, 3) and max(idle[VLLM] + idle[FASTSERVE]) < 0.5
    else:  # one switch per measurement after the first
        assert starts == {VLLM: 3, FASTSERVE: 2} and len(pids[VLLM]) == 3
        assert "idle_cpu_seconds" not in report
    for name, pid_set in pids.items():  # every server stopped at the end
        assert all(not Path(f"/proc/{pid}").exists() for pid in pid_set), name


def test_group_cpu_seconds_counts_every_process_below_the_server():
    """A process and its child, the child burning CPU: their time is counted, others' not."""
    import subprocess
    import time

    burn = (
        "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    )
    parent = (
        "import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', sys.argv[1]])\ntime.sleep(30)"
    )
    proc = subprocess.Popen([os.sys.executable, "-c", parent, burn], start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while vs_vllm.group_cpu_seconds(proc.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 0.6 <= vs_vllm.group_cpu_seconds(proc.pid) < 5
        assert vs_vllm.group_cpu_seconds(os.getpid() + 10**7) == 0  # no such process
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
