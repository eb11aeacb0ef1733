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
import json
import os
import statistics
import time

from fastserve.bench.companion_rounds import add_live_args, run_rounds
from fastserve.v1 import common_pb2

PENALTIES = {"repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": 0.5}


def sampling(max_tokens: int, penalised: bool) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **(PENALTIES if penalised else {})
    )


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
    add_live_args(parser, n=8)
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
    info, rates = run_rounds(args, sampling, ("without", "with"), whole_batch=False)
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
