"""Decode throughput of the worker's model against the memory-bandwidth bound.

A decode step reads every weight once and every sequence's KV context once, so it cannot
take less than (weight bytes + KV bytes) / peak memory bandwidth. For OPT-shaped dummy
models (random weights: nothing is downloaded) this times ``ModelRunner.step`` (input
preparation, attention over the paged pool, greedy sampling) over decode steps at a fixed
context, and prints tokens/s beside the bound's tokens/s and their ratio. The KV pool is
left zeroed: its values do not change the time, so no prefill is run.

The peak bandwidth comes from the GPU's name (``GPU_BANDWIDTH_GBS``) or ``--bandwidth-gbs``;
without either the bound is left out and only the achieved GB/s is reported.

    python -m fastserve.bench.decode_bound --models opt-1.3b,opt-6.7b --batch-sizes 1,16,64 --context 512 --out out/decode.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from fastserve.flags import add_flag
from fastserve.model_spec import PRESETS, ModelSpec

# Peak memory bandwidth (GB/s, vendor datasheets) by the words of `torch.cuda.get_device_name`;
# the first entry whose words all appear wins, so the more specific variants come first.
GPU_BANDWIDTH_GBS: list[tuple[frozenset[str], float]] = [
    (frozenset({"h200"}), 4800.0),
    (frozenset({"h100", "nvl"}), 3900.0),
    (frozenset({"h100", "pcie"}), 2000.0),
    (frozenset({"h100"}), 3350.0),  # SXM (HBM3)
    (frozenset({"a100", "80gb", "pcie"}), 1935.0),
    (frozenset({"a100", "80gb"}), 2039.0),  # SXM4
    (frozenset({"a100"}), 1555.0),  # 40GB
    (frozenset({"l40s"}), 864.0),
    (frozenset({"l40"}), 864.0),
    (frozenset({"l4"}), 300.0),
    (frozenset({"a10g"}), 600.0),
    (frozenset({"a10"}), 600.0),
    (frozenset({"v100"}), 900.0),
    (frozenset({"t4"}), 320.0),
]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """The table's peak bandwidth for a GPU name such as 'NVIDIA H100 80GB HBM3'; None if unknown."""
    words = set(re.split(r"[^a-z0-9]+", device_name.lower()))
    return next((gbs for needed, gbs in GPU_BANDWIDTH_GBS if needed <= words), None)


def bytes_per_step(spec: ModelSpec, batch: int, context: float, element_size: int) -> tuple[int, int]:
    """(weight bytes, KV bytes) one decode step reads: every parameter once (the tied LM head is
    the embedding, counted once; the few position rows actually read are counted as all of them),
    and K and V of every layer for ``context`` tokens of each of ``batch`` sequences."""
    weights = spec.num_params() * element_size
    kv = int(batch * context * 2 * spec.num_layers * spec.hidden_size * element_size)
    return weights, kv


def time_decode(
    runner, batch: int, context: int, blocks_per_seq: int, warmup: int, steps: int
) -> list[float]:
    """Seconds of each of ``steps`` decode steps of ``batch`` sequences starting at ``context``."""
    from fastserve.services.worker.runner import SeqWork

    tables = [list(range(b * blocks_per_seq, (b + 1) * blocks_per_seq)) for b in range(batch)]
    tokens = [4] * batch
    times = []
    for i in range(warmup + steps):
        work = [SeqWork(f"s{b}", [tokens[b]], context + i, tables[b], sample_index=1) for b in range(batch)]
        started = time.perf_counter()
        tokens = runner.step(work)  # a list of ints: the step has finished on the device
        if i >= warmup:
            times.append(time.perf_counter() - started)
    return times


def bench_model(name: str, args: argparse.Namespace, device: str, bandwidth_gbs: float | None) -> list[dict]:
    """One row per batch size for the preset ``name``; a case that fails is a row with its error."""
    from fastserve.services.worker.runner import ModelRunner

    spec = PRESETS[name]
    dtype = (
        DTYPES[args.dtype] if args.dtype != "auto" else (torch.float16 if device == "cuda" else torch.float32)
    )
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    last = args.context + args.warmup + args.steps
    if last > spec.max_positions:
        raise SystemExit(
            f"--context + --warmup + --steps = {last} exceeds {name}'s {spec.max_positions} positions"
        )
    blocks_per_seq = -(-last // args.block_size)
    runner = ModelRunner(
        spec,
        dtype=dtype,
        device=device,
        num_gpu_blocks=max(batches) * blocks_per_seq,
        block_size=args.block_size,
    )
    element_size = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for batch in batches:
        row: dict = {
            "model": name,
            "dtype": str(dtype).removeprefix("torch."),
            "batch": batch,
            "context": args.context,
        }
        try:
            times = time_decode(runner, batch, args.context, blocks_per_seq, args.warmup, args.steps)
        except (
            RuntimeError
        ) as exc:  # out of memory, a kernel that fails on this device: the next case may run
            rows.append({**row, "error": f"{type(exc).__name__}: {exc}"[:500]})
            continue
        step_s = statistics.median(times)
        mean_context = args.context + args.warmup + (args.steps + 1) / 2  # context grows one token a step
        weights, kv = bytes_per_step(spec, batch, mean_context, element_size)
        row |= {
            "step_ms": step_s * 1e3,
            "tokens_per_s": batch / step_s,
            "weight_bytes": weights,
            "kv_bytes": kv,
            "achieved_gbps": (weights + kv) / step_s / 1e9,
        }
        if bandwidth_gbs:
            bound_s = (weights + kv) / (bandwidth_gbs * 1e9)
            row |= {
                "bound_step_ms": bound_s * 1e3,
                "bound_tokens_per_s": batch / bound_s,
                "fraction_of_bound": bound_s / step_s,
            }
        rows.append(row)
        _print_row(row)
    del runner
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def _print_row(row: dict) -> None:
    bound = (
        f"{row['bound_tokens_per_s']:>11.0f} {row['fraction_of_bound']:>7.1%}"
        if "fraction_of_bound" in row
        else f"{'-':>11} {'-':>7}"
    )
    print(
        f"{row['model']:9s} {row['batch']:>5d} {row['context']:>7d} {row['step_ms']:>9.3f} "
        f"{row['tokens_per_s']:>10.0f} {bound} {row['achieved_gbps']:>9.1f}",
        flush=True,
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.decode_bound",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    add_flag(p, "--models", default="opt-1.3b,opt-6.7b", help=f"comma list of presets ({', '.join(PRESETS)})")
    add_flag(p, "--batch-sizes", default="1,16,64", help="comma list of sequences per step")
    add_flag(p, "--context", default=512, help="tokens of context each sequence has when timing starts")
    add_flag(p, "--warmup", default=5, help="untimed decode steps first")
    add_flag(p, "--steps", default=32, help="timed decode steps (the median is reported)")
    add_flag(p, "--block-size", default=16, help="tokens per KV block")
    add_flag(p, "--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU)", choices=["auto", *DTYPES])
    add_flag(p, "--device", default="auto", help="auto (cuda when present), cuda, cpu")
    add_flag(
        p,
        "--bandwidth-gbs",
        default=0.0,
        help="peak memory bandwidth in GB/s; 0 = from the GPU's name (GPU_BANDWIDTH_GBS), none on a CPU",
    )
    add_flag(p, "--out", default="", help="write the results as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = (
        torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    )
    bandwidth = args.bandwidth_gbs or (peak_bandwidth_gbs(device_name) if device == "cuda" else None)
    source = "--bandwidth-gbs" if args.bandwidth_gbs else ("GPU name" if bandwidth else "unknown")
    print(
        f"{device_name}: peak memory bandwidth {bandwidth or '?'} GB/s ({source}); medians of {args.steps} steps"
    )
    print(
        f"{'model':9s} {'batch':>5s} {'context':>7s} {'step ms':>9s} {'tokens/s':>10s} "
        f"{'bound tok/s':>11s} {'of bound':>7s} {'GB/s':>9s}"
    )
    rows = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in PRESETS:
            raise SystemExit(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
        try:
            rows += bench_model(name, args, device, bandwidth)
        except RuntimeError as exc:  # e.g. the weights or the KV pool do not fit: the next model may
            rows.append({"model": name, "batch": None, "error": f"{type(exc).__name__}: {exc}"[:500]})
    for row in rows:
        if "error" in row:
            print(f"{row['model']} batch {row['batch']}: {row['error']}", file=sys.stderr)
    result = {
        "benchmark": "decode_bound",
        "device": device_name,
        "torch": torch.__version__,
        "bandwidth_gbs": bandwidth,
        "bandwidth_source": source,
        "args": vars(args),
        "rows": rows,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
