"""Unit tests of the small shared pieces: block manager, detokenizer, stop strings, flags, validation."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from fastserve.flags import add_flag
from fastserve.services.gateway.text_stream import TextStream
from fastserve.services.gateway.validation import (
    InvalidRequest,
    Limits,
    check_envelope,
    check_length,
    resolve_sampling,
)
from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.tokenizer import ByteTokenizer, IncrementalDetokenizer
from fastserve.v1 import common_pb2, gateway_pb2

LIMITS = Limits(
    vocab_size=272, max_model_len=256, max_tokens_limit=128, max_request_bytes=1024, max_stop_strings=2
)


def test_block_manager_allocates_all_or_nothing_and_frees():
    bm = BlockManager(num_gpu_blocks=4, block_size=16)
    assert bm.allocate("a", 17) == [0, 1]
    assert bm.allocate("a", 32) == [0, 1]  # still fits
    assert bm.allocate("b", 40) is None and "b" not in bm.tables  # needs 3, only 2 free
    assert bm.num_free == 2
    assert bm.allocate("a", 33) == [0, 1, 2]
    assert bm.free("a") == 3 and bm.num_free == 4
    assert bm.allocate("b", 64) is not None and bm.num_free == 0


def test_block_manager_refuses_zero_blocks():
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        BlockManager(0, 16)


def test_detokenizer_never_splits_multibyte_characters():
    tok = ByteTokenizer()
    text = "naïve 世界 🚀!"
    ids = tok.encode(text)[1:]
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.add([i]) for i in ids]
    assert "".join(pieces) + detok.flush() == text
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_holds_back_only_possible_stop_prefixes_and_cuts_at_stop():
    tok = ByteTokenizer()
    stream = TextStream(tok, ("END",))
    out = stream.add(tok.encode("hello E")[1:])
    assert out == "hello" and not stream.stopped
    out += stream.add(tok.encode("NDING")[1:])
    assert stream.stopped and out == "hello "


def test_text_stream_names_the_earliest_stop_and_can_keep_it():
    tok = ByteTokenizer()
    stream = TextStream(tok, ("LO", "ELL", "EL"), include_stop=True)
    assert stream.add(tok.encode("HELLO")[1:]) == "HELL" and stream.matched == "ELL"


def test_text_stream_flushes_everything_without_stop():
    tok = ByteTokenizer()
    stream = TextStream(tok, ())
    assert stream.add(tok.encode("abc")[1:]) == "abc"
    assert stream.finish() == ""


def test_flag_reads_environment(monkeypatch):
    monkeypatch.setenv("FASTSERVE_MAX_BATCH_SIZE", "7")
    parser = argparse.ArgumentParser()
    add_flag(parser, "--max-batch-size", default=16, help="x")
    add_flag(parser, "--demo", default=True, help="y")
    assert parser.parse_args([]).max_batch_size == 7
    assert parser.parse_args(["--max-batch-size", "3"]).max_batch_size == 3
    assert parser.parse_args(["--demo", "false"]).demo is False


def request(**sampling) -> gateway_pb2.GenerateRequest:
    return gateway_pb2.GenerateRequest(prompt="hi", sampling=common_pb2.SamplingParams(**sampling))


def test_defaults_are_documented_values_when_unset():
    resolved = resolve_sampling(request(), LIMITS)
    s = resolved.resolved
    assert resolved.n == 1
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k, s.ignore_eos, s.min_tokens, s.min_p) == (
        16,
        1.0,
        1.0,
        0,
        False,
        0,
        0.0,
    )
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.0, 0.0, 1.0)
    assert not s.logprobs and not s.prompt_logprobs and not s.stop_token_ids and not s.logit_bias
    assert resolve_sampling(request(), LIMITS).resolved.seed != s.seed  # unseeded: the gateway draws one
    # an explicit zero is kept
    assert resolve_sampling(request(temperature=0.0), LIMITS).resolved.temperature == 0.0
    logprobs = resolve_sampling(request(logprobs=0, prompt_logprobs=3), LIMITS).resolved
    assert (logprobs.logprobs, logprobs.top_logprobs) == (True, 0)  # 0 = the sampled token's only
    assert (logprobs.prompt_logprobs, logprobs.prompt_top_logprobs) == (True, 3)


def test_completions_of_a_seeded_request_get_distinct_reproducible_seeds():
    sampling = resolve_sampling(request(seed=7, n=4), LIMITS)
    seeds = [sampling.job_sampling(i).seed for i in range(4)]
    assert seeds[0] == 7 and len(set(seeds)) == 4
    assert seeds == [resolve_sampling(request(seed=7, n=4), LIMITS).job_sampling(i).seed for i in range(4)]


@pytest.mark.parametrize(
    "sampling, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 129}, "128"),
        ({"temperature": -1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ["a", "b", "c"]}, "stop"),
        ({"stop": [""]}, "stop"),
        ({"n": 0}, "n: 0 is outside \\[1, 16\\]"),
        ({"n": 17}, "--max-n"),
        ({"min_tokens": 17}, "min_tokens: 17 exceeds sampling.max_tokens"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty: -2.5 is outside"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"logprobs": 21}, "logprobs: 21 exceeds the limit of 20"),
        ({"prompt_logprobs": 21}, "prompt_logprobs.*--max-logprobs"),
        ({"stop_token_ids": [5, 272]}, r"stop_token_ids\[1\]: 272 is outside the vocabulary"),
        ({"logit_bias": {272: 1.0}}, "logit_bias: 272 is outside the vocabulary"),
        ({"logit_bias": {5: 101.0}}, r"logit_bias\[5\]"),
    ],
)
def test_sampling_errors_name_field_and_limit(sampling, field):
    with pytest.raises(InvalidRequest, match=field):
        resolve_sampling(request(**sampling), LIMITS)


def test_structured_outputs_are_refused_by_a_gateway_with_another_tokenizer():
    schema = common_pb2.StructuredOutputs(json='{"type": "integer"}')
    assert resolve_sampling(request(structured_outputs=schema), LIMITS).resolved.HasField(
        "structured_outputs"
    )
    foreign = dataclasses.replace(LIMITS, structured_outputs_refused="not served with --tokenizer 'byte'")
    with pytest.raises(
        InvalidRequest, match="sampling.structured_outputs: not served with --tokenizer 'byte'"
    ):
        resolve_sampling(request(structured_outputs=schema), foreign)
    assert resolve_sampling(request(), foreign).resolved.max_tokens  # everything else is served


def test_envelope_and_length_errors():
    with pytest.raises(InvalidRequest, match="1024"):
        check_envelope(gateway_pb2.GenerateRequest(prompt="x" * 2000), LIMITS)
    with pytest.raises(InvalidRequest, match=r"prompt_token_ids\[1\]: 272"):
        check_envelope(gateway_pb2.GenerateRequest(prompt_token_ids=[2, 272]), LIMITS)
    with pytest.raises(InvalidRequest, match="256"):
        check_length(200, 57, LIMITS)
    check_length(200, 56, LIMITS)


def test_child_dies_when_parent_is_killed():
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import alive

    code = (
        "import sys, time; from fastserve.procs import popen_child; "
        "p = popen_child(['sleep', '60']); print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.3)
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)


def test_bad_kv_configuration_is_refused_at_start():
    import subprocess
    import sys

    from fastserve.services.worker.server import host_block_budget

    with pytest.raises(SystemExit, match="larger than this machine's memory"):
        host_block_budget(10**6, 65536)
    with pytest.raises(SystemExit, match="swap-space"):
        host_block_budget(-1, 65536)
    for flags, message in (
        (["--num-gpu-blocks", "-1"], "num-gpu-blocks"),
        (["--swap-space", "100000"], "swap-space"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "fastserve.services.worker", "--port", "0", *flags],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, proc.stderr[-500:]


def test_up_passes_mlfq_knobs_to_the_scheduler_and_threads_to_workers_only_when_given(monkeypatch):
    from fastserve.launcher import knob_flags, parse_args
    from fastserve.services.scheduler.server import parse_args as scheduler_args
    from fastserve.services.worker.server import parse_args as worker_args

    monkeypatch.delenv("FASTSERVE_STARVATION_THRESHOLD", raising=False)
    monkeypatch.delenv("FASTSERVE_ENFORCE_EAGER", raising=False)
    assert knob_flags(parse_args([]), "scheduler") == [] == knob_flags(parse_args([]), "worker")
    argv = [
        "--starvation-threshold",
        "5",
        "--quantum-ratio",
        "3",
        "--num-threads",
        "1",
        "--enforce-eager",
        "true",
    ]
    args = parse_args(argv)
    to_scheduler, to_worker = knob_flags(args, "scheduler"), knob_flags(args, "worker")
    assert to_scheduler == ["--quantum-ratio", "3", "--starvation-threshold", "5"]
    assert to_worker == ["--num-threads", "1", "--enforce-eager", "true"]
    parsed = scheduler_args(["--worker-addresses", "127.0.0.1:1", *to_scheduler])
    assert parsed.starvation_threshold == 5.0 and parsed.quantum_ratio == 3.0
    assert worker_args(to_worker).num_threads == 1 and worker_args(to_worker).enforce_eager
    assert not worker_args([]).enforce_eager


def test_worker_refuses_bad_cuda_graph_sizes_at_start_on_any_device(capsys, monkeypatch):
    from fastserve.services.worker.server import parse_args as worker_args

    monkeypatch.delenv("FASTSERVE_CUDA_GRAPH_SIZES", raising=False)
    assert worker_args([]).cuda_graph_sizes == [1, 2, 4, 8, 16, 24, 32, 48, 64]
    assert worker_args(["--cuda-graph-sizes", "8,2"]).cuda_graph_sizes == [2, 8]
    assert worker_args(["--cuda-graph-sizes", ""]).cuda_graph_sizes == []
    with pytest.raises(SystemExit):
        worker_args(["--device", "cpu", "--cuda-graph-sizes", "0,4"])
    assert "--cuda-graph-sizes must be comma-separated batch sizes >= 1, got '0,4'" in capsys.readouterr().err


def test_free_ports_come_from_outside_the_ephemeral_range_and_never_repeat():
    """An outgoing connection takes its port from the ephemeral range: a port handed out for a
    service that binds it seconds later must not come from there (a CI run lost a gateway to that)."""
    from pathlib import Path

    from fastserve.procs import free_port, free_ports

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = free_ports(50) + [free_port() for _ in range(50)]
    assert len(set(ports)) == 100
    assert all(1024 <= p < low for p in ports), (low, high, sorted(ports)[-3:])


def test_onednn_linear_matches_f_linear_and_refuses_what_it_cannot_serve():
    import torch

    from fastserve.services.worker import cpu_linear

    w, b, x = torch.randn(48, 32), torch.randn(48), torch.randn(5, 32)
    packed = cpu_linear.pack(w)
    assert packed is not None  # the CPU wheel these tests run on has oneDNN
    torch.testing.assert_close(cpu_linear.linear(x, w, packed, b), torch.nn.functional.linear(x, w, b))
    relu = cpu_linear.linear(x, w, packed, b, "relu")
    torch.testing.assert_close(relu, torch.nn.functional.linear(x, w, b).relu())
    assert cpu_linear.pack(w.half()) is None  # fp16 on CPU: F.linear serves it
    # every way a few rows can run: the same numbers, only their own rows
    try:
        for way in cpu_linear.WAYS:
            cpu_linear.few_rows.update(dict.fromkeys(range(1, cpu_linear.FEW_ROWS), way))
            for rows in range(1, cpu_linear.FEW_ROWS + 1):
                few = x[:rows]
                out = cpu_linear.linear(few, w, packed, b, "relu")
                assert out.shape == (rows, 48)
                torch.testing.assert_close(out, torch.nn.functional.linear(few, w, b).relu())
        # start-up picks what this CPU runs fastest: every row count below CHOSEN_ROWS timed every
        # way that serves it (padding only to FEW_ROWS)
        timings = cpu_linear.choose_few_rows([(w, packed)] * 8, rounds=3)
        assert sorted(timings) == list(range(1, cpu_linear.CHOSEN_ROWS))
        for rows, ms in timings.items():
            want = set(cpu_linear.WAYS) - ({"padded"} if rows >= cpu_linear.FEW_ROWS else set())
            assert set(ms) == want and all(t > 0 for t in ms.values())
            assert ms[cpu_linear.few_rows.get(rows, "packed")] == min(ms.values())
    finally:
        cpu_linear.few_rows.clear()


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("out_features", [1, 6, 48])
def test_the_cpp_few_row_linear_matches_f_linear(rows, out_features):
    """Weight rows go four at a time, input rows two at a time: short last runs of both, with and
    without bias and relu, a strided input."""
    import torch

    from fastserve.services.worker.cpu_kernels import few_rows_linear

    kernel = few_rows_linear()
    assert kernel is not None, "the C++ kernels did not build here (see the worker's log)"
    gen = torch.Generator().manual_seed(rows * 100 + out_features)
    w, b = torch.randn(out_features, 37, generator=gen), torch.randn(out_features, generator=gen)
    x = torch.randn(rows, 74, generator=gen)[:, ::2]  # not contiguous
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(kernel(x, w, b, False), want)
    torch.testing.assert_close(kernel(x, w, b, True), want.relu())
    torch.testing.assert_close(kernel(x, w, torch.empty(0), False), torch.nn.functional.linear(x, w))
    with pytest.raises(RuntimeError, match="fp32 only"):
        kernel(x.double(), w.double(), b.double(), False)


def test_packed_weights_lists_each_linear_and_the_lm_head_once_in_step_order():
    import torch

    from fastserve.model_spec import resolve_model
    from fastserve.services.worker.loader import init_dummy
    from fastserve.services.worker.model import OPTShard
    from fastserve.services.worker.tp import ParallelContext

    model = OPTShard(resolve_model("opt-tiny"), ParallelContext(), dtype=torch.float32, device="cpu")
    init_dummy(model, 0)
    packed = model.prepack()
    weights = model.packed_weights()
    assert len(weights) == packed  # the tied LM head (also the embedding) counted once
    assert weights[-1][0] is model.lm_head.weight
    assert len({id(w) for w, _ in weights}) == len(weights)
