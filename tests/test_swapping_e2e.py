"""KV swapping on the live stack: a GPU tier too small for the load, a host tier too small for the rest."""

from __future__ import annotations

import threading

import grpc

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import start_stack
from tests.internal_rpc import kv_stats
from tests.records import settled_records

REQUESTS = [([2, *range(20 + 7 * i, 20 + 7 * i + 10 + (i % 5) * 6)], 30 + (i % 4) * 10) for i in range(16)]


def run_all(stub) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}

    def one(i: int) -> None:
        prompt, max_tokens = REQUESTS[i]
        sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        tokens = []
        for reply in stub.Generate(
            gateway_pb2.GenerateRequest(
                prompt_token_ids=prompt, sampling=sampling, request_id=f"swap-{id(stub)}-{i}"
            ),
            timeout=300,
        ):
            tokens.extend(reply.token_ids)
        out[i] = tokens

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


def test_swapped_and_recomputed_requests_match_unlimited_memory(redis_url, tiny_checkpoint, checkpoint_stack):
    reference = run_all(
        gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(checkpoint_stack.addresses["gateway"]))
    )
    stack = start_stack(
        redis_url,
        "--model",
        tiny_checkpoint,
        "--policy",
        "skip-join-mlfq",
        "--max-batch-size",
        "4",
        "--num-gpu-blocks",
        "24",
        "--num-host-blocks",
        "16",
        "--swap-policy",
        "proactive",
    )
    try:
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(stack.addresses["gateway"]))
        constrained = run_all(stub)
        stats = kv_stats(stack)
        records = list(
            settled_records(redis_url, [f"swap-{id(stub)}-{i}" for i in range(len(REQUESTS))]).values()
        )
    finally:
        stack.stop()
    assert stats.blocks_swapped_out > 0 and stats.blocks_swapped_in > 0, stats
    assert stats.recomputes > 0, stats
    assert any(int(r["swaps_out"]) > 0 for r in records) and any(int(r["recomputes"]) > 0 for r in records)
    assert all(r["state"] == "finished" for r in records)
    for i in range(len(REQUESTS)):
        assert constrained[i] == reference[i], f"request {i} differs after swapping"
