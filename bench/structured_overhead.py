"""What constrained decoding costs (live stack, one run): output tokens per second of a batch with
half its rows constrained by a JSON schema against the same batch with none constrained.

Starts the whole stack once (FCFS, so a round's 2 x N requests run in one batch) and runs rounds
of 2 x N concurrent requests (ignore_eos, same lengths): N plain requests plus N companions that
are plain ("none") or carry `structured_outputs.json` ("half"; the schema is an array of strings
long enough to outlast max_tokens, so every step masks). Rounds alternate after a warm-up (that
also compiles the schema once), so drift on a shared machine hits both alike. Reports the whole
batch's output tokens per second in each kind of round and the ratio half / none.

`--driver-only VOCAB` times, in process, the driver's sampling step (logits processing, grammar
masks, sampling) with no row constrained and with half of them, on a byte vocabulary padded to
VOCAB: the first number is what an unconstrained batch pays.

python -m fastserve.bench.scoring_check make /tmp/opt125 --vocab 50272 --layers 12 --hidden 768
python -m fastserve.bench.structured_overhead --model /tmp/opt125 --json docs/results/structured_overhead.json
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

SCHEMA = json.dumps({"type": "array", "items": {"type": "string"}})  # never has to end


async def one(stub, prompt: list[int], max_tokens: int, constrained: bool) -> int:
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True)
    if constrained:
        sampling.structured_outputs.json = SCHEMA
    tokens = 0
    async for reply in stub.Generate(gateway_pb2.GenerateRequest(prompt_token_ids=prompt, sampling=sampling)):
        tokens += len(reply.token_ids)
    return tokens


async def round_(stub, prompts: list[list[int]], max_tokens: int, half: bool) -> float:
    """One round; the whole batch's output tokens per second."""
    n = len(prompts) // 2
    started = time.perf_counter()
    plain = [one(stub, p, max_tokens, False) for p in prompts[:n]]
    companions = [one(stub, p, max_tokens, half) for p in prompts[n:]]
    counts = await asyncio.gather(*plain, *companions)
    return sum(counts) / (time.perf_counter() - started)


async def measure(address: str, args: argparse.Namespace, vocab: int) -> dict[str, list[float]]:
    rng = random.Random(args.seed)
    prompts = [[2, *(rng.randrange(4, vocab) for _ in range(args.prompt_len - 1))] for _ in range(2 * args.n)]
    async with grpc.aio.insecure_channel(address) as chan:
        stub = gateway_pb2_grpc.GatewayStub(chan)
        await round_(stub, prompts, args.max_tokens, True)  # warm-up (compiles the schema once)
        out: dict[str, list[float]] = {"none": [], "half": []}
        for _ in range(args.rounds):
            for kind in ("none", "half"):
                out[kind].append(await round_(stub, prompts, args.max_tokens, kind == "half"))
        return out


def driver_cost(vocab: int, rows: int, steps: int = 30) -> tuple[float, float]:
    """Seconds per driver sampling step: no row constrained, then half (best of 5)."""
    import torch

    from fastserve import structured
    from fastserve.services.worker.runner import SeqWork
    from fastserve.services.worker.sampling import Sampler, SamplingParams
    from fastserve.services.worker.structured import Grammars

    grammars = Grammars("byte", vocab, 2)
    key = structured.key(common_pb2.StructuredOutputs(json=SCHEMA))
    grammars.compile(key).result()
    sampler = Sampler(0, "cpu")

    def per_step(constrained: int) -> float:
        params = [
            SamplingParams(temperature=1.0, seed=i, structured=key if i < constrained else None)
            for i in range(rows)
        ]
        seqs = [SeqWork(f"r{i}", [2, 40], 0, [0], params[i], 0) for i in range(rows)]
        best = float("inf")
        for _ in range(5):
            grammars.forget([s.request_id for s in seqs])
            for s in seqs:
                s.start_pos, s.sample_index = 0, 0
            started = time.perf_counter()
            for step in range(steps):
                logits = torch.randn(rows, vocab)
                hit = [k for k, p in enumerate(params) if p.structured is not None]
                if hit:
                    grammars.mask(logits, seqs, hit)
                tokens = sampler(logits, params, [step] * rows)
                if hit:
                    grammars.accept(seqs, hit, tokens)
                for s in seqs:
                    s.start_pos, s.sample_index = 10 + step, step + 1
            best = min(best, (time.perf_counter() - started) / steps)
        return best

    return per_step(0), per_step(rows // 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="opt-125m", help="preset or checkpoint (its tokenizer sets the masks)"
    )
    parser.add_argument("--n", type=int, default=4, help="plain requests per round (and as many companions)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each kind, alternating")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="", help="write the result here")
    parser.add_argument(
        "--driver-only", type=int, default=0, help="VOCAB: time only the driver's sampling step in process"
    )
    args = parser.parse_args(argv)
    if args.driver_only:
        none, half = driver_cost(args.driver_only, 2 * args.n)
        print(
            f"driver sampling step, {2 * args.n} rows, vocab {args.driver_only}: none constrained "
            f"{none * 1e3:.2f} ms, half constrained {half * 1e3:.2f} ms (+{(half - none) * 1e3:.2f} ms)"
        )
        return 0
    flags = ["--host", "127.0.0.1", "--port", str(free_port()), "--model", args.model, "--demo", "false"]
    flags += [
        "--policy",
        "fcfs",
        "--max-batch-size",
        str(2 * args.n),
        "--log-level",
        "WARNING",
        "--http-port",
        "0",
    ]
    stack = Stack(up_args(flags))
    try:
        address = stack.start()
        info = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address)).ServerInfo(
            gateway_pb2.ServerInfoRequest()
        )
        rates = asyncio.run(measure(address, args, info.vocab_size))
    finally:
        stack.stop()
    none, half = statistics.mean(rates["none"]), statistics.mean(rates["half"])
    result = {
        "model": args.model,
        "vocab_size": info.vocab_size,
        "device": info.device,
        "batch": 2 * args.n,
        "constrained_in_half_rounds": args.n,
        "schema": json.loads(SCHEMA),
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "batch_tokens_per_s": rates,
        "ratio_half_over_none": half / none,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_after": os.getloadavg()[0],
    }
    print(
        f"{args.model} (vocab {info.vocab_size}, {info.device}): batch output tokens/s with no row "
        f"constrained {none:.1f}, half constrained {half:.1f}; ratio {half / none:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
