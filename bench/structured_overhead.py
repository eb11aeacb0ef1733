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
import json
import os
import statistics
import time

from fastserve.bench.companion_rounds import add_live_args, run_rounds
from fastserve.v1 import common_pb2

SCHEMA = json.dumps({"type": "array", "items": {"type": "string"}})  # never has to end


def sampling(max_tokens: int, constrained: bool) -> common_pb2.SamplingParams:
    params = common_pb2.SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=1, ignore_eos=True)
    if constrained:
        params.structured_outputs.json = SCHEMA
    return params


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
    add_live_args(parser, n=4)
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
    info, rates = run_rounds(args, sampling, ("none", "half"), whole_batch=True)
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
