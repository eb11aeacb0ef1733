"""The worker's model step (model + sampling, as `ModelRunner.run` does it inside the worker),
on the reference path (``--enforce-eager``) and the fast path, in one run.

For each (batch, context) case both paths get the same dummy weights and the same prompts,
are prefilled, then run decode steps alternately (one step of one path, then one of the
other), so the noise of a shared machine hits both alike:

* ``decode``: every sequence feeds one token; ``context`` tokens are already cached.
* ``mixed``: the same decodes plus one new prompt of ``--prefill-tokens`` tokens in the same
  step (what an iteration looks like when a job joins).

``paired`` is the median over adjacent (fast, eager) pairs of fast / eager: below 1 = faster.
``agree`` says whether both paths sampled the same greedy tokens throughout. With
``--profile`` each path's decode step is also run under the torch profiler and its top ops
(self CPU time) are saved, the breakdown docs/benchmarks.md quotes.

    python -m fastserve.bench.worker_step --batch-sizes 1,4,16 --contexts 128,512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fastserve.services.worker.omp_env import openmp_defaults  # noqa: E402 - imports no torch

os.environ.update(openmp_defaults(sys.argv[1:], os.environ))  # as the worker starts (omp_env.py)

import torch  # noqa: E402 - after the wait policy, which torch's OpenMP reads at load

from fastserve.flags import parse_bool  # noqa: E402
from fastserve.model_spec import PRESETS, resolve_model  # noqa: E402
from fastserve.services.worker.cpu_share import ThreadGovernor  # noqa: E402

MODES = ("eager", "fast")
GOVERNOR: ThreadGovernor | None = None  # the worker's thread governor, unless --adaptive-threads false
BUSY_LOOP = "import time\nend = time.time() + 1800\nwhile time.time() < end:\n    pass"  # bounded: 30 min


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.worker_step", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("--model", default="opt-125m", help=f"preset shape ({', '.join(PRESETS)})")
    p.add_argument("--batch-sizes", default="1,4,16")
    p.add_argument("--contexts", default="128,512", help="cached tokens per sequence, comma list")
    p.add_argument("--steps", type=int, default=10, help="timed decode (and mixed) steps per path and case")
    p.add_argument("--prefill-tokens", type=int, default=128, help="the new prompt of a mixed step")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--profile", action="store_true", help="also record each path's top ops per case")
    p.add_argument(
        "--busy-cores",
        type=int,
        default=0,
        help="keep this many cores busy with bounded busy loops (other processes) while timing",
    )
    p.add_argument(
        "--adaptive-threads",
        default=True,
        type=parse_bool,
        help="as the worker: fewer threads while other processes keep the CPUs busy (true/false)",
    )
    p.add_argument("--out", default="out/worker_step.json", help="JSON results path")
    return p


class Side:
    """One runner (one path) and the jobs of the current case."""

    def __init__(self, spec, mode: str, num_blocks: int, block_size: int) -> None:
        from fastserve.services.worker.runner import ModelRunner

        started = time.perf_counter()
        self.runner = ModelRunner(
            spec,
            dtype=torch.float32,
            device="cpu",
            num_gpu_blocks=num_blocks,
            block_size=block_size,
            enforce_eager=mode == "eager",
        )
        self.setup_s = time.perf_counter() - started
        self.block_size = block_size

    def start(self, case: str, prompts: list[list[int]], blocks_per_seq: int) -> list[int]:
        from fastserve.services.worker.runner import SeqWork

        self.case = case
        self.tables = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
        self.newcomer_table = list(range(len(prompts) * blocks_per_seq, (len(prompts) + 1) * blocks_per_seq))
        self.pos = len(prompts[0])
        work = [
            SeqWork(f"{case}-{i}", p, 0, t) for i, (p, t) in enumerate(zip(prompts, self.tables, strict=True))
        ]
        return self.runner.step(work)

    def decode(self, tokens: list[int], newcomer: list[int] | None = None) -> list[int]:
        """One step: a token per sequence (and, for a mixed step, a new prompt)."""
        from fastserve.services.worker.runner import SeqWork

        work = [
            SeqWork(f"{self.case}-{i}", [tok], self.pos, t)
            for i, (tok, t) in enumerate(zip(tokens, self.tables, strict=True))
        ]
        if newcomer is not None:  # the same job re-prefilled every time: its blocks are reused
            work.append(SeqWork(f"{self.case}-new", newcomer, 0, self.newcomer_table))
        self.pos += 1
        if GOVERNOR is not None:
            GOVERNOR.apply()
        out = self.runner.step(work)
        return out[: len(tokens)]


def top_ops(side: Side, tokens: list[int], steps: int, limit: int = 12) -> list[dict]:
    """The ops taking most self CPU time over ``steps`` decode steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            tokens = side.decode(tokens)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:limit]
    return [
        {"op": e.key, "ms_per_step": e.self_cpu_time_total / 1e3 / steps, "calls_per_step": e.count / steps}
        for e in events
    ]


def summary(times: dict[str, list[float]]) -> dict:
    pairs = [f / e for f, e in zip(times["fast"], times["eager"], strict=True)]
    return {
        **{f"{m}_ms": statistics.median(times[m]) * 1e3 for m in MODES},
        "paired": statistics.median(pairs),
        "samples": len(pairs),
    }


def bench_case(sides: dict[str, Side], spec, batch: int, context: int, args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(batch * 100003 + context)
    prompts = torch.randint(4, spec.vocab_size, (batch, context), generator=gen).tolist()
    newcomer = torch.randint(4, spec.vocab_size, (args.prefill_tokens,), generator=gen).tolist()
    blocks_per_seq = -(-(max(context + 2 * args.steps + 4, args.prefill_tokens)) // args.block_size)
    case = f"b{batch}c{context}"
    tokens = {m: sides[m].start(case, prompts, blocks_per_seq) for m in MODES}
    agree = tokens["eager"] == tokens["fast"]
    decode: dict[str, list[float]] = {m: [] for m in MODES}
    mixed: dict[str, list[float]] = {m: [] for m in MODES}
    for phase, times in (("decode", decode), ("mixed", mixed)):
        for step in range(args.steps + 1):  # step 0 warms up
            order = MODES if step % 2 else MODES[::-1]
            for m in order:
                started = time.perf_counter()
                tokens[m] = sides[m].decode(tokens[m], newcomer if phase == "mixed" else None)
                if step:
                    times[m].append(time.perf_counter() - started)
            agree = agree and tokens["eager"] == tokens["fast"]
    row = {
        "batch": batch,
        "context": context,
        "greedy_tokens_agree": agree,
        "decode": summary(decode),
        "mixed": summary(mixed),
    }
    if args.profile:
        row["top_ops"] = {m: top_ops(sides[m], tokens[m], 3) for m in MODES}
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    global GOVERNOR
    if args.adaptive_threads:
        GOVERNOR = ThreadGovernor(torch.get_num_threads())
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    spec = resolve_model(args.model)
    longest = max(contexts) + 2 * (args.steps + 1) + 4
    blocks = (max(batches) + 1) * -(-max(longest, args.prefill_tokens) // args.block_size)
    sides = {m: Side(spec, m, blocks, args.block_size) for m in MODES}
    busy = [
        subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) for _ in range(args.busy_cores)
    ]  # each stops by itself after BUSY_LOOP's bound, and is killed below in any case
    print(
        f"{spec.name} fp32 on CPU ({torch.get_num_threads()} threads); setup s: "
        + ", ".join(f"{m} {sides[m].setup_s:.1f}" for m in MODES),
        flush=True,
    )
    rows = []
    try:
        cases = [(b, c) for b in batches for c in contexts]
        for batch, context in cases:
            row = bench_case(sides, spec, batch, context, args)
            rows.append(row)
            d, x = row["decode"], row["mixed"]
            print(
                f"B={batch:<3} ctx={context:<4} decode eager {d['eager_ms']:6.1f} ms  fast {d['fast_ms']:6.1f} ms"
                f"  x{d['paired']:.2f} | mixed(+{args.prefill_tokens}) eager {x['eager_ms']:6.1f}"
                f"  fast {x['fast_ms']:6.1f}  x{x['paired']:.2f} | agree={row['greedy_tokens_agree']}",
                flush=True,
            )
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": spec.name,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT", "unset"),
        "adaptive_threads": GOVERNOR is not None,
        "busy_cores": args.busy_cores,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "setup_s": {m: sides[m].setup_s for m in MODES},
        "prefill_tokens": args.prefill_tokens,
        "steps": args.steps,
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
