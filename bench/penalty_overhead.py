"""What penalised requests cost the plain ones sharing their batch (live stack, one run).

Starts the whole stack once (FCFS, so every request of a round runs in one batch) and runs
rounds of 2 x N concurrent greedy requests, ignore_eos, same lengths: N plain requests plus
N companions that are plain too ("without") or carry repetition, frequency and presence
penalties ("with"). Rounds alternate without / with after a warm-up, so drift on a shared
machine hits both alike. Reports the plain requests' output tokens per second in each kind
of round and the ratio with / without (1.0 = the plain requests pay nothing).

python -m fastserve.bench.penalty_overhead --model opt-125m --json docs/results/penalty_overhead.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time

import grpc

from fastserve.launcher import Stack
from fastserve.launcher import parse_args as up_args
from fastserve.procs import free_port
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5}


async def one(stub, prompt: list[int], max_tokens: int, penalised: bool) -> int:
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **(PENALTIES if penalised else {})
    )
    tokens = 0
    async for reply in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)):
        tokens += len(reply.token_ids)
    return tokens


async def round_(stub, prompts: list[list[int]], max_tokens: int, with_penalties: bool) -> float:
    """One round; the plain requests' output tokens per second."""
    n = len(prompts) // 2
    started = time.perf_counter()
    plain = [one(stub, p, max_tokens, False) for p in prompts[:n]]
    companions = [one(stub, p, max_tokens, with_penalties) for p in prompts[n:]]
    counts = await asyncio.gather(*plain, *companions)
    return sum(counts[:n]) / (time.perf_counter() - started)


async def measure(address: str, args: argparse.Namespace, vocab: int) -> dict[str, list[float]]:
    rng = random.Random(args.seed)
    prompts = [[2, *(rng.randrange(4, vocab) for _ in range(args.prompt_len - 1))] for _ in range(2 * args.n)]
    async with grpc.aio.insecure_channel(address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        await round_(stub, prompts, args.max_tokens, True)  # warm-up
        out: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(args.rounds):
            for kind in ("without", "with"):
                out[kind].append(await round_(stub, prompts, args.max_tokens, kind == "with"))
        return out


def driver_cost(vocab: int, rows: int, steps: int = 50) -> tuple[float, float]:
    """Seconds per iteration of the driver's logits processing + sampling + counting, in process:
    all rows plain, then half of them penalised (best of 5)."""
    import torch

    from fastserve.services.worker.penalties import TokenCounts, process_logits
    from fastserve.services.worker.sampling import Sampler, SamplingParams

    counts = TokenCounts(vocab, torch.device("cpu"))
    ids = [f"r{i}" for i in range(rows)]
    for rid in ids:
        counts.start(rid, list(range(2, 18)), list(range(20, 30)))
    sampler = Sampler(0, "cpu")

    def per_step(params: list[SamplingParams]) -> float:
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(steps):
                logits = torch.randn(rows, vocab)
                process_logits(logits, params, [10] * rows, ids, counts)
                tokens = sampler(logits, params, [10] * rows)
                hit = [i for i, p in enumerate(params) if p.penalised]
                if hit:
                    counts.add([ids[i] for i in hit], [tokens[i] for i in hit])
            best = min(best, (time.perf_counter() - started) / steps)
        return best

    plain, penalised = SamplingParams(), SamplingParams(**PENALTIES)
    return per_step([plain] * rows), per_step([plain] * (rows // 2) + [penalised] * (rows - rows // 2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="opt-125m", help="preset or checkpoint (its vocabulary sets the cost)"
    )
    parser.add_argument("--n", type=int, default=8, help="plain requests per round (and as many companions)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the result here")
    parser.add_argument(
        "--driver-only", type=int, default=0, help="VOCAB: time only the driver's sampling work in process"
    )
    args = parser.parse_args(argv)
    if args.driver_only:
        plain, mixed = driver_cost(args.driver_only, 2 * args.n)
        print(
            f"driver sampling per iteration, {2 * args.n} rows, vocab {args.driver_only}: all plain "
            f"{plain * 1e3:.1f} ms, half penalised {mixed * 1e3:.1f} ms (+{(mixed - plain) * 1e3:.1f} ms)"
        )
        return 0
    flags = ["--host", "127.0.0.1", "--port", str(free_port()), "--model", args.model, "--demo", "false"]
    flags += ["--policy", "fcfs", "--max-batch-size", str(2 * args.n), "--log-level", "WARNING"]
    stack = Stack(up_args(flags))
    try:
        address = stack.start()
        info = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address)).ServerInfo(
            gateway_pb2.ServerInfoRequest()
        )
        rates = asyncio.run(measure(address, args, info.vocab_size))
    finally:
        stack.stop()
    without, with_ = statistics.mean(rates["without"]), statistics.mean(rates["with"])
    result = {
        "model": args.model,
        "vocab_size": info.vocab_size,
        "device": info.device,
        "plain_requests": args.n,
        "companions": args.n,
        "penalties": PENALTIES,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "plain_tokens_per_s": rates,
        "ratio_with_over_without": with_ / without,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_after": os.getloadavg()[0],
    }
    print(
        f"{args.model} (vocab {info.vocab_size}, {info.device}): plain requests' tokens/s "
        f"without penalised companions {without:.1f}, with {with_:.1f}; ratio {with_ / without:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
