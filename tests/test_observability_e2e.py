"""Traces and metrics of the live stack: a real OTLP/gRPC receiver on loopback, real /metrics pages."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import defaultdict
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from fastserve.procs import free_port
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Collects every exported span as (trace id, service name, span)."""

    def __init__(self) -> None:
        self.spans: list[tuple[bytes, str, object]] = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((span.trace_id, attrs.get("service.name", ""), span))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture(scope="module")
def receiver():
    sink = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield sink, f"http://127.0.0.1:{port}"
    server.stop(0)


@pytest.fixture(scope="module")
def traced_stack(redis_url, tiny_checkpoint, receiver, monkeypatch_module):
    _, endpoint = receiver
    monkeypatch_module.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch_module.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--num-gpu-blocks",
        "128",
        "--policy",
        "skip-join-mlfq",
        "--max-batch-size",
        "1",
        "--served-model-name",
        "traced",
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def generate(stub, prompt_ids, max_tokens, request_id):
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return list(
        stub.Generate(
            gateway_pb2.GenerateRequest(
                prompt_token_ids=prompt_ids, sampling=sampling, request_id=request_id
            ),
            timeout=120,
        )
    )


def test_one_trace_spans_services_and_preemption_events_carry_levels(traced_stack, receiver):
    sink, _ = receiver
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(traced_stack.addresses["gateway"]))
    streamed: list[int] = []

    def long_one() -> None:
        sampling = common_pb2.SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
        request = gateway_pb2.GenerateRequest(
            prompt_token_ids=[2, *range(10, 60)], sampling=sampling, request_id="long-traced"
        )
        for reply in stub.Generate(request, timeout=120):
            streamed.extend(reply.token_ids)

    long_job = threading.Thread(target=long_one)
    long_job.start()
    deadline = time.monotonic() + 60
    # 10 iterations run: past the top queues' quanta, so demoted; then a short one arrives and preempts it
    while len(streamed) < 10:
        assert time.monotonic() < deadline and long_job.is_alive(), "the long job did not start"
        time.sleep(0.005)
    assert len(streamed) < 200, "the long job finished before the short one was sent"
    generate(stub, [2, 5, 6], 4, "short-traced")
    long_job.join(120)

    services = {"fastserve-gateway", "fastserve-scheduler", "fastserve-worker"}
    deadline = time.monotonic() + 60
    while True:  # spans arrive in batches; wait for both requests' traces
        with sink.lock:
            by_trace = defaultdict(set)
            for trace_id, service, _ in sink.spans:
                by_trace[trace_id].add(service)
            long_span = next(
                (
                    span
                    for _, service, span in sink.spans
                    if service == "fastserve-scheduler"
                    and span.name == "fastserve.schedule"
                    and any(
                        a.key == "fastserve.request_id" and a.value.string_value == "long-traced"
                        for a in span.attributes
                    )
                ),
                None,
            )
        if (
            long_span is not None and any(services <= s for s in by_trace.values())
        ) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert any(services <= s for s in by_trace.values()), dict(by_trace)
    assert long_span is not None, "the long request's scheduler span never arrived"
    events = {e.name: {a.key: a.value.int_value for a in e.attributes} for e in long_span.events}
    assert "preempted" in events and "level" in events["preempted"]
    assert "demoted" in events and events["demoted"]["to_level"] == events["demoted"]["from_level"] + 1
    assert "queued" in events and "finished" in events


def scrape(address: str) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def test_metrics_agree_with_what_was_served(traced_stack):
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(traced_stack.addresses["gateway"]))
    before = scrape(traced_stack.addresses["gateway-metrics"])
    for i in range(3):
        generate(stub, [2, 7, 8, 9], 5, f"metrics-{i}")
    gateway = scrape(traced_stack.addresses["gateway-metrics"])
    scheduler = scrape(traced_stack.addresses["scheduler-metrics"])

    def delta(name):
        return gateway.get(name, 0.0) - before.get(name, 0.0)

    model = 'model_name="traced"'
    assert delta(f"fastserve:generation_tokens_total{{{model}}}") == 15
    assert delta(f"fastserve:prompt_tokens_total{{{model}}}") == 12
    assert delta(f'fastserve:request_success_total{{finished_reason="length",{model}}}') == 3
    assert delta(f"fastserve:time_to_first_token_seconds_count{{{model}}}") == 3
    assert delta(f"fastserve:e2e_request_latency_seconds_count{{{model}}}") == 3
    assert delta(f"fastserve:time_per_output_token_seconds_count{{{model}}}") == 3
    assert delta(f"fastserve:request_prompt_tokens_sum{{{model}}}") == 12
    assert delta(f"fastserve:request_generation_tokens_sum{{{model}}}") == 15
    for name in (
        "fastserve:iteration_time_seconds_count",
        f"fastserve:num_requests_running{{{model}}}",
        'fastserve:kv_blocks_used{tier="gpu"}',
        f"fastserve:num_preemptions_total{{{model}}}",
        "fastserve:num_demotions_total",
        f"fastserve:request_queue_time_seconds_count{{{model}}}",
    ):
        assert name in scheduler, name
    kvmanager = scrape(traced_stack.addresses["kvmanager-metrics"])
    assert 0 <= kvmanager[f"fastserve:kv_cache_usage_perc{{{model}}}"] <= 1
    assert kvmanager[f"fastserve:num_requests_swapped{{{model}}}"] == 0
    worker = scrape(traced_stack.addresses["worker0-metrics"])
    assert worker['fastserve:worker_kv_blocks{tier="gpu"}'] == 128
    # each request's 4 tokens after its first come from decode-only steps, timed in the worker
    decode_steps = worker["fastserve:worker_decode_step_seconds_count"]
    assert 9 <= decode_steps <= scheduler["fastserve:iteration_time_seconds_count"]
    assert worker["fastserve:worker_decode_step_seconds_sum"] > 0
    assert scheduler['fastserve:request_finished_total{state="finished"}'] >= 3
    assert scheduler["fastserve:iteration_time_seconds_count"] >= 15
    # once idle, the gauges say so (they used to keep the last iteration's values)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        idle = scrape(traced_stack.addresses["scheduler-metrics"])
        if (
            idle[f"fastserve:num_requests_running{{{model}}}"] == 0
            and not idle['fastserve:kv_blocks_used{tier="gpu"}']
        ):
            break
        time.sleep(0.1)
    assert idle[f"fastserve:num_requests_running{{{model}}}"] == 0
    assert idle['fastserve:kv_blocks_used{tier="gpu"}'] == 0
