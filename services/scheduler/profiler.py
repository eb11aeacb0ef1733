"""Start-up profile of the workers, for the cost model the policy places jobs with.

Runs a few real steps before any job exists (so any KV block is free to use):
prefills of several lengths and decode batches of several sizes. Each sample is
(prefill tokens, decode sequences, total context tokens, seconds), the form the
cost model fits.
"""

from __future__ import annotations

import logging
import time

from fastserve.v1 import common_pb2, worker_pb2

from .workers import WorkerGroup

log = logging.getLogger("fastserve.scheduler.profiler")

Sample = tuple[int, int, int, float]
GREEDY = common_pb2.ResolvedSampling(max_tokens=1, temperature=0.0, top_p=1.0, repetition_penalty=1.0)


def _seq(i: int, tokens: list[int], start_pos: int, blocks: list[int]) -> worker_pb2.SeqStep:
    return worker_pb2.SeqStep(
        request_id=f"__profile{i}",
        token_ids=tokens,
        start_pos=start_pos,
        block_table=blocks,
        sampling=GREEDY,
    )


async def profile(
    workers: WorkerGroup,
    *,
    block_size: int,
    num_blocks: int,
    max_len: int,
    max_batch_size: int,
    max_batched_tokens: int,
    repeats: int = 3,
) -> list[Sample]:
    step_id = 10**12  # far from the engine's step ids
    samples: list[Sample] = []

    async def timed(seqs: list[worker_pb2.SeqStep]) -> float:
        nonlocal step_id
        best = float("inf")
        for _ in range(repeats):
            step_id += 1
            started = time.perf_counter()
            await workers.step(worker_pb2.StepRequest(step_id=step_id, seqs=seqs, profile=True))
            best = min(best, time.perf_counter() - started)
        return best

    usable_len = min(max_len, num_blocks * block_size, max_batched_tokens)
    blocks = list(range(min(num_blocks, -(-usable_len // block_size))))
    await timed([_seq(0, [4] * min(8, usable_len), 0, blocks)])  # warm-up
    for length in sorted(
        {n for n in (16, 64, 128, 256, 512, 1024) if n <= usable_len} | {min(usable_len, 1024)}
    ):
        samples.append((length, 0, length, await timed([_seq(0, [4] * length, 0, blocks)])))
    context = min(64, usable_len)
    ctx_blocks = blocks[: -(-context // block_size)]
    for batch in sorted({b for b in (1, 2, 4, 8, 16, 32, 64) if b <= max_batch_size} | {max_batch_size}):
        seqs = [
            _seq(i, [4], context - 1, ctx_blocks) for i in range(batch)
        ]  # they share blocks: only timing matters
        samples.append((0, batch, batch * context, await timed(seqs)))
    log.info(
        "profiled %d step shapes: prefill %s s, decode %s s",
        len(samples),
        [f"{n}:{t:.4f}" for n, _, _, t in samples if n],
        [f"{b}:{t:.4f}" for _, b, _, t in samples if b],
    )
    return samples
