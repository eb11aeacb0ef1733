"""The live half of the overhead benchmarks (penalty_overhead, structured_overhead).

One stack (FCFS, batch 2 x N, so a round's requests run in one batch) and rounds of 2 x N
concurrent requests of the same lengths (ignore_eos): N plain requests beside N companions that
are plain too or carry the feature under test. Rounds alternate after a warm-up with the feature
on, so drift on a shared machine hits both kinds alike.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from collections.abc import Callable

import grpc

from fastserve.launcher import Stack
from fastserve.launcher import parse_args as up_args
from fastserve.procs import free_port
from fastserve.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

# (max_tokens, with the feature?) -> the request's sampling
MakeSampling = Callable[[int, bool], common_pb2.SamplingParams]


def add_live_args(parser: argparse.ArgumentParser, n: int) -> None:
    parser.add_argument("--n", type=int, default=n, help="plain requests per round (and as many companions)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the result here")


async def _one(stub, prompt: list[int], sampling: common_pb2.SamplingParams) -> int:
    tokens = 0
    async for reply in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)):
        tokens += len(reply.token_ids)
    return tokens


async def _round(
    stub, prompts: list[list[int]], max_tokens: int, make: MakeSampling, featured: bool, whole_batch: bool
) -> float:
    """One round's output tokens per second: the whole batch's, or the plain requests' alone."""
    n = len(prompts) // 2
    started = time.perf_counter()
    plain = [_one(stub, p, make(max_tokens, False)) for p in prompts[:n]]
    companions = [_one(stub, p, make(max_tokens, featured)) for p in prompts[n:]]
    counts = await asyncio.gather(*plain, *companions)
    return sum(counts if whole_batch else counts[:n]) / (time.perf_counter() - started)


async def _measure(
    address: str,
    args: argparse.Namespace,
    vocab: int,
    make: MakeSampling,
    kinds: tuple[str, str],
    whole_batch: bool,
) -> dict[str, list[float]]:
    rng = random.Random(args.seed)
    prompts = [[2, *(rng.randrange(4, vocab) for _ in range(args.prompt_len - 1))] for _ in range(2 * args.n)]
    async with grpc.aio.insecure_channel(address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        await _round(
            stub, prompts, args.max_tokens, make, True, whole_batch
        )  # warm-up (compiles what the feature needs)
        out: dict[str, list[float]] = {kind: [] for kind in kinds}
        for _ in range(args.rounds):
            for kind in kinds:
                out[kind].append(
                    await _round(stub, prompts, args.max_tokens, make, kind == kinds[1], whole_batch)
                )
        return out


def run_rounds(
    args: argparse.Namespace, make: MakeSampling, kinds: tuple[str, str], whole_batch: bool
) -> tuple[gateway_pb2.ServerInfoResponse, dict[str, list[float]]]:
    """Starts the stack on `args.model`, runs the rounds (kinds: without the feature, with it) and
    stops it; the server's info and each kind's tokens per second, round by round."""
    flags = ["--host", "127.0.0.1", "--port", str(free_port()), "--model", args.model, "--demo", "false"]
    flags += ["--policy", "fcfs", "--max-batch-size", str(2 * args.n), "--log-level", "WARNING"]
    flags += ["--http-port", "0"]
    stack = Stack(up_args(flags))
    try:
        address = stack.start()
        info = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address)).ServerInfo(
            gateway_pb2.ServerInfoRequest()
        )
        rates = asyncio.run(_measure(address, args, info.vocab_size, make, kinds, whole_batch))
    finally:
        stack.stop()
    return info, rates
