"""`fastserve bench`: replays a workload trace against a live gateway over gRPC.

Requests go out at their trace arrival times on concurrent streams (greedy,
ignore_eos, max_tokens = the trace's output length, random prompt token ids of the
trace's input length), so the same trace and seed give the same load for every
policy. Reports the same metrics and JSON as the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

import grpc
from tqdm import tqdm

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass
class RequestRecord:
    """What one request experienced, in seconds since the start of the run."""

    arrival: float
    first_token: float
    finish: float
    input_len: int
    output_tokens: int
    preemptions: int
    finish_reason: str


async def send_one(stub, request_id: str, prompt: list[int], max_tokens: int, start: float) -> RequestRecord:
    arrival = time.monotonic() - start
    first = 0.0
    count = 0
    reason = "error"
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    call = stub.Generate(
        gateway_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling)
    )
    async for reply in call:
        if reply.token_ids and not first:
            first = time.monotonic() - start
        count += len(reply.token_ids)
        if reply.finish_reason:
            reason = common_pb2.FinishReason.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower()
    finish = time.monotonic() - start
    info = await stub.GetRequest(gateway_pb2.GetRequestRequest(request_id=request_id))
    return RequestRecord(arrival, first or finish, finish, len(prompt), count, info.preemptions, reason)


async def replay(
    address: str, trace: list[tuple[float, int, int]], seed: int, run_id: str
) -> tuple[list[RequestRecord], dict]:
    """Sends (arrival_time, input_len, output_len) requests on schedule; returns records and the server's info."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        info = await stub.ServerInfo(gateway_pb2.ServerInfoRequest())
        rng = random.Random(seed)
        start = time.monotonic()
        tasks = []
        progress = tqdm(total=len(trace), desc="requests", unit="req", file=sys.stderr)
        for i, (arrival, input_len, output_len) in enumerate(trace):
            input_len = max(1, min(input_len, info.max_model_len - 1))
            output_len = max(1, min(output_len, info.max_model_len - input_len, info.max_tokens_limit))
            prompt = [rng.randrange(4, info.vocab_size) for _ in range(input_len)]
            delay = arrival - (time.monotonic() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send_one(stub, f"{run_id}-{i}", prompt, output_len, start))
            task.add_done_callback(lambda _: progress.update())
            tasks.append(task)
        records = await asyncio.gather(*tasks)
        progress.close()
    server = {
        "model": info.model,
        "policy": info.policy,
        "max_batch_size": info.max_batch_size,
        "device": info.device,
        "swap_policy": info.swap_policy,
    }
    return list(records), server


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--address", default="127.0.0.1:50051", help="gateway address")
    parser.add_argument("--workload", default="alpaca", help="sharegpt | alpaca | sharegpt-real | FILE.jsonl")
    parser.add_argument(
        "--tokenizer",
        default="sharegpt-bpe",
        help="sharegpt-real: sharegpt-bpe | byte | whitespace | HF tokenizer dir (bench/sharegpt.py)",
    )
    parser.add_argument(
        "--dataset", default="", help="sharegpt-real: the ShareGPT JSON (default: the package's)"
    )
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second")
    parser.add_argument(
        "--cv", type=float, default=1.0, help="coefficient of variation of arrivals (1 = Poisson)"
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-input-len", type=int, default=0, help="clip prompts (0 = the server's limit)")
    parser.add_argument("--max-output-len", type=int, default=0, help="clip outputs (0 = the server's limit)")
    parser.add_argument("--slo", type=float, default=0.3, help="seconds per output token")
    parser.add_argument(
        "--label", default="", help="name for this run in the report (default: the server's policy)"
    )
    parser.add_argument("--json", default="", help="append the result object to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from bench.report import summarize
    from bench.workloads import load_trace

    args = parse_args(argv)
    trace = load_trace(
        args.workload,
        num_requests=args.num_requests,
        rate=args.rate,
        cv=args.cv,
        seed=args.seed,
        tokenizer=args.tokenizer,
        dataset=args.dataset,
    )
    if args.max_input_len or args.max_output_len:
        trace = [(a, min(i, args.max_input_len or i), min(o, args.max_output_len or o)) for a, i, o in trace]
    records, server = asyncio.run(replay(args.address, trace, args.seed, f"bench-{int(time.time() * 1000)}"))
    result = {
        "policy": args.label or server["policy"],
        "rate": args.rate,
        "workload": args.workload,
        "server": server,
        **summarize([asdict(r) for r in records], slo=args.slo),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        try:
            with open(args.json) as f:
                existing = json.load(f)
        except FileNotFoundError:
            existing = []
        with open(args.json, "w") as f:
            json.dump([*existing, result], f, indent=2)
    return 0
