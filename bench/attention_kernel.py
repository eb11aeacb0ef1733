"""Micro-benchmark: Triton paged decode attention vs. a torch gather + SDPA path.

On CUDA, for OPT-like head configurations (OPT-1.3B: 32 heads x 64, OPT-6.7B: 32 heads x 128,
heads divided by ``--tp``), batch sizes and context lengths, it builds a paged KV pool whose
blocks are shuffled across sequences, checks the kernel against the torch path, and times

* ``triton``: ``fastserve.services.worker.triton_attention.triton_paged_decode_attention``;
* ``torch_sdpa``: gather every sequence's blocks into a dense ``[B, H, L, D]`` K/V
  (``k_cache[block_tables]``), then ``scaled_dot_product_attention`` with a length mask;
* ``torch_path``: ``fastserve.services.worker.attention.paged_decode_attention`` when that module exists.

Times are CUDA-event medians over repeats. ``kv_gbps`` is the K/V bytes a sequence's context
occupies divided by the Triton time: the kernel's effective bandwidth. Results print as a table
and, with ``--out``, are saved as JSON.

Without CUDA it says so, runs one correctness check of the kernel under Triton's CPU
interpreter (in a subprocess with ``TRITON_INTERPRET=1``) and exits 0 if that check passes.

    python -m fastserve.bench.attention_kernel                       # defaults
    python -m fastserve.bench.attention_kernel --models opt-6.7b --batch-sizes 1,32 --context-lens 2048 --out r.json
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

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

MODELS = {  # name -> (num_heads, head_dim)
    "opt-1.3b": (32, 64),
    "opt-6.7b": (32, 128),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _csv_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastserve.bench.attention_kernel",
        description=__doc__.split("\n\n")[0],
        allow_abbrev=False,
    )
    p.add_argument("--models", default="opt-1.3b,opt-6.7b", help=f"comma list of {sorted(MODELS)}")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree: heads per rank = heads / tp")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--context-lens", default="128,512,2048", help="mean context length per case")
    p.add_argument(
        "--ragged",
        action="store_true",
        help="draw each sequence's length uniformly in [1, 2*mean) instead of all equal to the mean",
    )
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float16")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=50, help="calls per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tile", type=int, default=None, help="override the kernel's TILE")
    p.add_argument("--num-warps", type=int, default=None, help="override the kernel's num_warps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--interpreter-check", action="store_true", help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------
# Inputs and baselines
# ------------------------------------------------------------------------------------------


def make_inputs(batch, num_heads, head_dim, lens, block_size, dtype, device, gen):
    """A shuffled paged KV pool holding ``lens[b]`` tokens for each sequence, plus its tables.

    ``gen`` (a CPU generator) draws the block permutation and seeds the values, which are
    generated on ``device`` directly (the pools can be GBs).
    """
    blocks_per_seq = [(n + block_size - 1) // block_size for n in lens]
    max_blocks = max(blocks_per_seq)
    num_blocks = sum(blocks_per_seq) + 1
    perm = torch.randperm(num_blocks, generator=gen)
    block_tables = torch.full((batch, max_blocks), int(perm[-1]), dtype=torch.int32)
    cursor = 0
    for b, nb in enumerate(blocks_per_seq):
        block_tables[b, :nb] = perm[cursor : cursor + nb].to(torch.int32)
        cursor += nb
    context_lens = torch.tensor(lens, dtype=torch.int32)
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    shape = (num_blocks, block_size, num_heads, head_dim)
    k_cache = torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
    v_cache = torch.randn(shape, generator=dev_gen, device=device, dtype=dtype)
    q = torch.randn((batch, num_heads, head_dim), generator=dev_gen, device=device, dtype=dtype)
    return q, k_cache, v_cache, block_tables.to(device), context_lens.to(device)


def torch_gather_sdpa(q, k_cache, v_cache, block_tables, context_lens, scale):
    """Dense baseline: materialise each sequence's K/V from its blocks, then masked SDPA."""
    batch, num_heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    max_len = block_tables.shape[1] * block_size
    idx = block_tables.long()
    k = k_cache[idx].reshape(batch, max_len, num_heads, head_dim).transpose(1, 2)  # [B, H, L, D]
    v = v_cache[idx].reshape(batch, max_len, num_heads, head_dim).transpose(1, 2)
    valid = torch.arange(max_len, device=q.device)[None, :] < context_lens[:, None].long()  # [B, L]
    out = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None, :], k, v, attn_mask=valid[:, None, None, :], scale=scale
    )
    return out[:, :, 0, :]


def _load_torch_path():
    try:
        from fastserve.services.worker.attention import paged_decode_attention
    except ImportError:
        return None
    return paged_decode_attention


def time_cuda(fn, warmup: int, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per call over ``iters`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    means = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        means.append(start.elapsed_time(end) / iters)
    return statistics.median(means)


# ------------------------------------------------------------------------------------------
# GPU benchmark
# ------------------------------------------------------------------------------------------


def time_wall(fn, warmup: int, iters: int, repeats: int) -> float:
    """CPU counterpart of ``time_cuda`` (only for dry runs under the interpreter)."""
    for _ in range(warmup):
        fn()
    means = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        means.append((time.perf_counter() - t0) * 1e3 / iters)
    return statistics.median(means)


def run_gpu(args, device: torch.device | None = None) -> dict:
    from fastserve.services.worker.triton_attention import launch_config, triton_paged_decode_attention

    device = device or torch.device("cuda")
    timer = time_cuda if device.type == "cuda" else time_wall
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    torch_path = _load_torch_path()
    tol = {"float32": 1e-4, "float16": 4e-3, "bfloat16": 3e-2}[args.dtype]  # vs. SDPA, both rounded
    results = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}; choose from {sorted(MODELS)}")
        heads, head_dim = MODELS[model]
        if heads % args.tp:
            raise SystemExit(f"{model}: {heads} heads not divisible by tp={args.tp}")
        heads //= args.tp
        scale = head_dim**-0.5
        for batch in _csv_ints(args.batch_sizes):
            for mean_len in _csv_ints(args.context_lens):
                if args.ragged:
                    lens = torch.randint(1, 2 * mean_len, (batch,), generator=gen).tolist()
                else:
                    lens = [mean_len] * batch
                inputs = make_inputs(batch, heads, head_dim, lens, args.block_size, dtype, device, gen)
                q, k_cache, v_cache, block_tables, context_lens = inputs

                def triton_call(inputs=inputs, scale=scale):
                    return triton_paged_decode_attention(
                        *inputs, scale, tile=args.tile, num_warps=args.num_warps
                    )

                def sdpa_call(inputs=inputs, scale=scale):
                    return torch_gather_sdpa(*inputs, scale)

                out_triton = triton_call()
                out_sdpa = sdpa_call()
                max_err = (out_triton.float() - out_sdpa.float()).abs().max().item()
                row = {
                    "model": model,
                    "num_heads": heads,
                    "head_dim": head_dim,
                    "batch": batch,
                    "mean_context_len": mean_len,
                    "total_tokens": int(sum(lens)),
                    "max_abs_err_vs_sdpa": max_err,
                    "ok": max_err < tol,
                    "triton_ms": timer(triton_call, args.warmup, args.iters, args.repeats),
                    "torch_sdpa_ms": timer(sdpa_call, args.warmup, args.iters, args.repeats),
                }
                if torch_path is not None:

                    def path_call(inputs=inputs, scale=scale):
                        return torch_path(*inputs, scale)

                    row["torch_path_ms"] = timer(path_call, args.warmup, args.iters, args.repeats)
                kv_bytes = 2 * sum(lens) * heads * head_dim * q.element_size()
                row["kv_gbps"] = kv_bytes / (row["triton_ms"] * 1e-3) / 1e9
                row["speedup_vs_sdpa"] = row["torch_sdpa_ms"] / row["triton_ms"]
                results.append(row)
                _print_row(row)
                del inputs, q, k_cache, v_cache, block_tables, context_lens, out_triton, out_sdpa
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    config = {str(d): launch_config(d) for d in sorted({MODELS[m][1] for m in MODELS})}
    return {
        "benchmark": "paged_decode_attention",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "dtype": args.dtype,
        "block_size": args.block_size,
        "tp": args.tp,
        "ragged": args.ragged,
        "tile_override": args.tile,
        "num_warps_override": args.num_warps,
        "default_launch_config": config,
        "timing": {"warmup": args.warmup, "iters": args.iters, "repeats": args.repeats, "stat": "median"},
        "results": results,
        "all_ok": all(r["ok"] for r in results),
    }


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


_HEADER = (
    f"{'model':9s} {'H':>3s} {'D':>4s} {'B':>4s} {'ctx':>6s} {'triton ms':>10s} "
    f"{'sdpa ms':>9s} {'speedup':>8s} {'KV GB/s':>8s} {'max err':>9s}"
)


def _print_row(row: dict) -> None:
    if not getattr(_print_row, "_header_done", False):
        print(_HEADER, flush=True)
        _print_row._header_done = True
    extra = f"  torch_path {row['torch_path_ms']:.3f} ms" if "torch_path_ms" in row else ""
    print(
        f"{row['model']:9s} {row['num_heads']:3d} {row['head_dim']:4d} {row['batch']:4d} "
        f"{row['mean_context_len']:6d} {row['triton_ms']:10.4f} {row['torch_sdpa_ms']:9.4f} "
        f"{row['speedup_vs_sdpa']:7.2f}x {row['kv_gbps']:8.1f} {row['max_abs_err_vs_sdpa']:9.2e}"
        f"{'' if row['ok'] else '  MISMATCH'}{extra}",
        flush=True,
    )


# ------------------------------------------------------------------------------------------
# CPU: interpreter correctness check
# ------------------------------------------------------------------------------------------


def interpreter_check() -> int:
    """One small mixed-length case under the interpreter vs. gather+SDPA in fp32 (in-process)."""
    from fastserve.services.worker import triton_attention as ta

    if not ta.TRITON_AVAILABLE:
        print("interpreter check: triton is not installed")
        return 1
    if not ta.interpreter_active():
        print("interpreter check: TRITON_INTERPRET=1 was not set before the kernel module was imported")
        return 1
    gen = torch.Generator().manual_seed(0)
    lens = [1, 15, 16, 17, 70]
    inputs = make_inputs(len(lens), 4, 64, lens, 16, torch.float32, torch.device("cpu"), gen)
    t0 = time.perf_counter()
    out = ta.triton_paged_decode_attention(*inputs, 64**-0.5)
    elapsed = time.perf_counter() - t0
    ref = torch_gather_sdpa(*inputs, 64**-0.5)
    err = (out - ref).abs().max().item()
    ok = err < 1e-5
    print(
        f"interpreter check (B={len(lens)}, H=4, D=64, block_size=16, lens={lens}, fp32): "
        f"max abs err vs gather+SDPA {err:.2e} (bound 1e-5) in {elapsed:.2f}s: {'OK' if ok else 'FAILED'}"
    )
    return 0 if ok else 1


def _run_interpreter_check_subprocess() -> int:
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [sys.executable, "-m", "fastserve.bench.attention_kernel", "--interpreter-check"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
    return proc.returncode


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.interpreter_check:
        return interpreter_check()
    if not torch.cuda.is_available():
        print(
            f"fastserve.bench.attention_kernel needs a CUDA GPU to time the kernel (this is {platform.machine()} "
            "without CUDA); running one correctness check under Triton's CPU interpreter instead."
        )
        return _run_interpreter_check_subprocess()
    report = run_gpu(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    if not report["all_ok"]:
        print("WARNING: some cases disagree with the SDPA baseline beyond tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
