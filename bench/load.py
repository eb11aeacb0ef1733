"""`fastserve bench`: replays a workload trace against a live server, over gRPC or OpenAI HTTP.

Requests go out at their trace arrival times on concurrent streams (greedy,
ignore_eos, max_tokens = the trace's output length, random prompt token ids of the
trace's input length), so the same trace and seed give the same load for every
policy and every server. `--backend grpc` talks to FastServe's gateway;
`--backend openai` streams `/v1/completions` from any OpenAI-compatible server
(FastServe's HTTP port, vLLM, ...). Prints a summary like vLLM's serving benchmark
(throughput; TTFT, TPOT, ITL, end-to-end latency) and the same JSON as the simulator.
With FastServe, demotions, promotions and preemptions come per request from the
server (`GetRequest`: over gRPC, `--address`, also for the openai backend).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import grpc
import httpx
from tqdm import tqdm

from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

OPT_VOCAB = 50272  # token ids of random prompts for a server that does not say its vocabulary
TEXT_ALPHABET = "abcdefghijklmnopqrstuvwxyz "


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
    demotions: int = 0
    promotions: int = 0
    itl: list[float] = field(default_factory=list)  # gaps between the messages that carried tokens


async def send_grpc(stub, request_id: str, prompt: list[int], max_tokens: int, start: float) -> RequestRecord:
    arrival = time.monotonic() - start
    times: list[float] = []
    count = 0
    reason = "error"
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    call = stub.Generate(
        gateway_pb2.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, sampling=sampling)
    )
    async for reply in call:
        if reply.token_ids:
            times.append(time.monotonic() - start)
        count += len(reply.token_ids)
        if reply.finish_reason:
            reason = common_pb2.FinishReason.Name(reply.finish_reason).removeprefix("FINISH_REASON_").lower()
    return record(arrival, times, time.monotonic() - start, len(prompt), count, reason)


async def send_openai(
    client,
    url: str,
    model: str,
    request_id: str,
    prompt: list[int] | str,
    max_tokens: int,
    start: float,
    ignore_eos: bool = True,
) -> RequestRecord:
    body: dict = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    arrival = time.monotonic() - start
    times: list[float] = []
    count = chunks = 0
    reason = "error"
    try:
        async with client.stream("POST", url, json=body, headers={"X-Request-Id": request_id}) as reply:
            if reply.status_code != 200:
                await reply.aread()
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.text}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[len("data: ") :])
                if "error" in event:
                    raise RuntimeError(str(event["error"]))
                for choice in event.get("choices") or []:
                    if choice.get("text"):
                        times.append(time.monotonic() - start)
                        chunks += 1
                    reason = choice.get("finish_reason") or reason
                if event.get("usage"):
                    count = event["usage"]["completion_tokens"]
    except (RuntimeError, httpx.TransportError) as exc:
        # a failed request is a result, as vLLM's benchmark counts it: the run goes on
        print(f"{url}: request {request_id} failed: {type(exc).__name__} {exc}", file=sys.stderr)
        return record(arrival, times, time.monotonic() - start, len(prompt), chunks, "error")
    return record(arrival, times, time.monotonic() - start, len(prompt), count or chunks, reason)


def record(arrival: float, times: list[float], finish: float, input_len: int, count: int, reason: str):
    itl = [b - a for a, b in zip(times, times[1:], strict=False)]
    first = times[0] if times else finish
    return RequestRecord(arrival, first, finish, input_len, count, 0, reason, itl=itl)


async def server_counts(address: str, records: dict[str, RequestRecord]) -> None:
    """Preemptions, demotions and promotions per request, as FastServe's scheduler counted them."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for request_id, rec in records.items():
            info = await stub.GetRequest(gateway_pb2.GetRequestRequest(request_id=request_id))
            rec.preemptions, rec.demotions, rec.promotions = info.preemptions, info.demotions, info.promotions


async def replay(
    address: str, trace: list[tuple[float, int, int]], seed: int, run_id: str, prompts=None
) -> tuple[list[RequestRecord], dict]:
    """Sends (arrival_time, input_len, output_len) requests on schedule over gRPC; returns records and the server's info."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        info = await stub.ServerInfo(gateway_pb2.ServerInfoRequest())

        def send(request_id: str, prompt: list[int], max_tokens: int, start: float):
            return send_grpc(stub, request_id, prompt, max_tokens, start)

        records = await schedule(
            trace, seed, run_id, info.vocab_size, info.max_model_len, info.max_tokens_limit, send, prompts
        )
    await server_counts(address, records)
    server = {
        "backend": "grpc",
        "model": info.model,
        "policy": info.policy,
        "max_batch_size": info.max_batch_size,
        "device": info.device,
        "swap_policy": info.swap_policy,
    }
    return list(records.values()), server


async def replay_openai(
    base_url: str,
    trace: list[tuple[float, int, int]],
    seed: int,
    run_id: str,
    vocab_size: int,
    fastserve_address: str = "",
    api_key: str = "",
    text_prompts: bool = False,
    ignore_eos: bool = True,
) -> tuple[list[RequestRecord], dict]:
    """The same over OpenAI HTTP: streamed /v1/completions with the prompt as token ids, or as
    text of one character per prompt token (for servers that take text only)."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(headers=headers, timeout=None, limits=limits) as client:
        models = (await client.get(f"{base_url}/v1/models")).raise_for_status().json()["data"]
        model = models[0]["id"]
        max_model_len = models[0].get("max_model_len") or 1 << 30
        url = f"{base_url}/v1/completions"

        def send(request_id: str, prompt: list[int], max_tokens: int, start: float):
            body: list[int] | str = prompt
            if text_prompts:  # the first token stands for the tokenizer's BOS
                body = "".join(TEXT_ALPHABET[t % len(TEXT_ALPHABET)] for t in prompt[1:]) or "a"
            return send_openai(client, url, model, request_id, body, max_tokens, start, ignore_eos)

        records = await schedule(trace, seed, run_id, vocab_size, max_model_len, 1 << 30, send)
    if fastserve_address:
        await server_counts(fastserve_address, records)
    return list(records.values()), {"backend": "openai", "base_url": base_url, "model": model}


async def schedule(
    trace, seed, run_id, vocab_size, max_model_len, max_tokens_limit, send, prompts=None
) -> dict:
    """Sends every request of `trace` at its arrival time; the records by request id. A request's
    prompt is its row of `prompts` (token ids, when the trace file has them), else random ids."""
    rng = random.Random(seed)
    start = time.monotonic()
    tasks = {}
    progress = tqdm(total=len(trace), desc="requests", unit="req", file=sys.stderr)
    for i, (arrival, input_len, output_len, *_) in enumerate(trace):
        input_len = max(1, min(input_len, max_model_len - 1))
        output_len = max(1, min(output_len, max_model_len - input_len, max_tokens_limit))
        if prompts and prompts[i]:
            prompt = list(prompts[i][:input_len])
        else:
            prompt = [rng.randrange(4, vocab_size) for _ in range(input_len)]
        delay = arrival - (time.monotonic() - start)
        if delay > 0:
            await asyncio.sleep(delay)
        request_id = f"{run_id}-{i}"
        task = asyncio.create_task(send(request_id, prompt, output_len, start))
        task.add_done_callback(lambda _: progress.update())
        tasks[request_id] = task
    await asyncio.gather(*tasks.values())
    progress.close()
    return {request_id: task.result() for request_id, task in tasks.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fastserve bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--backend", choices=["grpc", "openai"], default="grpc", help="how to reach the server"
    )
    parser.add_argument(
        "--address",
        default="",
        help="FastServe's gRPC gateway (default 127.0.0.1:50051 for --backend grpc); with --backend "
        "openai, where to read per-request demotions and promotions (empty = not FastServe)",
    )
    parser.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="OpenAI-compatible server (openai)"
    )
    parser.add_argument("--api-key", default="", help="Bearer key for --backend openai")
    parser.add_argument(
        "--vocab-size", type=int, default=OPT_VOCAB, help="prompt token ids are drawn below this (openai)"
    )
    parser.add_argument(
        "--prompt-format",
        choices=["ids", "text"],
        default="ids",
        help="openai: prompts as token ids, or as text of one character per token (byte-level tokenizers)",
    )
    parser.add_argument(
        "--ignore-eos",
        type=lambda text: text.lower() in ("1", "true", "yes"),
        default=True,
        help="openai: send vLLM's ignore_eos (false for servers that refuse unknown fields)",
    )
    parser.add_argument("--workload", default="alpaca", help="sharegpt | alpaca | FILE.jsonl")
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


def trace_prompts(workload: str, n: int) -> list[list[int] | None] | None:
    """The `prompt_ids` of the first `n` rows of a JSONL trace that has them (a real prompt's token
    ids, which a --length-predictor reads), else None: prompts are random ids."""
    if not workload.endswith(".jsonl"):
        return None
    with open(workload) as f:
        rows = [json.loads(line).get("prompt_ids") for line in f if line.strip()][:n]
    return rows if any(rows) else None


def main(argv: list[str] | None = None) -> int:
    from fastserve.bench.report import format_summary, summarize
    from fastserve.bench.workloads import load_trace

    args = parse_args(argv)
    trace = load_trace(
        args.workload, num_requests=args.num_requests, rate=args.rate, cv=args.cv, seed=args.seed
    )
    if args.max_input_len or args.max_output_len:
        trace = [
            (a, min(i, args.max_input_len or i), min(o, args.max_output_len or o)) for a, i, o, *_ in trace
        ]
    run_id = f"bench-{int(time.time() * 1000)}"
    started = time.monotonic()
    if args.backend == "grpc":
        prompts = trace_prompts(args.workload, len(trace))
        records, server = asyncio.run(
            replay(args.address or "127.0.0.1:50051", trace, args.seed, run_id, prompts)
        )
    else:
        records, server = asyncio.run(
            replay_openai(
                args.base_url.rstrip("/"),
                trace,
                args.seed,
                run_id,
                args.vocab_size,
                args.address,
                args.api_key,
                args.prompt_format == "text",
                args.ignore_eos,
            )
        )
    result = {
        "policy": args.label or server.get("policy") or server["model"],
        "rate": args.rate,
        "workload": args.workload,
        "server": server,
        "duration": time.monotonic() - started,
        **summarize([asdict(r) for r in records], slo=args.slo),
    }
    print(format_summary(result), file=sys.stderr)
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
