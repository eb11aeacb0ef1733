"""Triton decode attention over a paged KV cache.

One query token per sequence attends to that sequence's whole context, which lives in
fixed-size blocks of a shared KV pool and is addressed through a block table:

    token t of sequence b  ->  k_cache[block_tables[b, t // block_size], t % block_size]

The kernel runs one program per (sequence, head). Each program walks the context in tiles
of ``TILE`` tokens (a tile may span several KV blocks, or part of one), gathers the keys
and values of the tile through the block table, and folds them into an online softmax
(running max ``m``, running denominator ``l``, un-normalised accumulator ``acc``), all
in fp32 whatever the cache dtype. Positions ``>= context_lens[b]`` are masked, so context
lengths need not be multiples of ``block_size`` and padded block-table entries are never
read.

On a machine without a GPU the kernel still runs under Triton's interpreter: set
``TRITON_INTERPRET=1`` in the environment *before this module is imported* (the
``@triton.jit`` decorator picks the interpreter at decoration time) and pass CPU
tensors. Importing this module never fails when Triton is missing; calling the kernel
then raises a clear error. ``TRITON_AVAILABLE`` says which case applies.

The torch path with the same signature is ``fastserve.services.worker.attention.paged_decode_attention``.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    TRITON_AVAILABLE = True
    _TRITON_IMPORT_ERROR: BaseException | None = None
except Exception as exc:  # ImportError, or a broken install that fails on import
    triton = None
    tl = None
    TRITON_AVAILABLE = False
    _TRITON_IMPORT_ERROR = exc

__all__ = [
    "TRITON_AVAILABLE",
    "SUPPORTED_DTYPES",
    "interpreter_active",
    "launch_config",
    "triton_paged_decode_attention",
]

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_LOG2E = 1.4426950408889634


def interpreter_active() -> bool:
    """True when the kernel was built for Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _KERNEL_INTERPRETED


if TRITON_AVAILABLE:

    @triton.jit
    def _paged_decode_attention_kernel(
        Q,  # [B, H, D]
        K_cache,  # [num_blocks, block_size, H, D]
        V_cache,  # [num_blocks, block_size, H, D]
        Block_tables,  # int32 [B, max_blocks_per_seq]
        Context_lens,  # int32 [B]
        Out,  # [B, H, D]
        qk_scale,  # softmax scale * log2(e): the kernel works in base 2
        stride_qb,
        stride_qh,
        stride_qd,
        stride_kn,
        stride_kt,
        stride_kh,
        stride_kd,
        stride_vn,
        stride_vt,
        stride_vh,
        stride_vd,
        stride_btb,
        stride_btn,
        stride_ob,
        stride_oh,
        stride_od,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,  # next power of two >= HEAD_DIM
        KV_BLOCK_SIZE: tl.constexpr,
        TILE: tl.constexpr,  # tokens per loop iteration (power of two)
    ):
        seq = tl.program_id(0)
        head = tl.program_id(1)
        seq64 = seq.to(tl.int64)
        head64 = head.to(tl.int64)

        context_len = tl.load(Context_lens + seq)

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_t = tl.arange(0, TILE)

        q = tl.load(Q + seq64 * stride_qb + head64 * stride_qh + offs_d * stride_qd, mask=d_mask, other=0.0)
        q = q.to(tl.float32) * qk_scale

        m_i = tl.full((), float("-inf"), tl.float32)  # running max of the (base-2) logits
        l_i = tl.zeros((), tl.float32)  # running sum of exp2(logit - m_i)
        acc = tl.zeros((BLOCK_D,), tl.float32)  # running sum of exp2(logit - m_i) * v

        bt_row = Block_tables + seq64 * stride_btb
        for start in range(0, context_len, TILE):
            pos = start + offs_t  # logical token positions of this tile
            t_mask = pos < context_len
            logical_block = pos // KV_BLOCK_SIZE
            slot = (pos % KV_BLOCK_SIZE).to(tl.int64)
            physical_block = tl.load(bt_row + logical_block * stride_btn, mask=t_mask, other=0).to(tl.int64)

            kv_mask = t_mask[:, None] & d_mask[None, :]
            k_ptrs = (
                K_cache
                + physical_block[:, None] * stride_kn
                + slot[:, None] * stride_kt
                + head64 * stride_kh
                + offs_d[None, :] * stride_kd
            )
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [TILE, BLOCK_D]

            logits = tl.sum(k * q[None, :], axis=1)  # [TILE]
            logits = tl.where(t_mask, logits, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(logits, axis=0))
            # Only reachable with an empty tile (never: start < context_len); keeps exp2 finite.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)  # rescales what was accumulated so far; 0 on the first tile
            p = tl.exp2(logits - m_safe)  # masked positions -> exp2(-inf) = 0

            v_ptrs = (
                V_cache
                + physical_block[:, None] * stride_vn
                + slot[:, None] * stride_vt
                + head64 * stride_vh
                + offs_d[None, :] * stride_vd
            )
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0).to(tl.float32)  # [TILE, BLOCK_D]

            l_i = l_i * alpha + tl.sum(p, axis=0)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            m_i = m_new

        # context_len == 0 (not a valid decode input) yields zeros rather than NaN.
        denom = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / denom
        tl.store(
            Out + seq64 * stride_ob + head64 * stride_oh + offs_d * stride_od,
            out.to(Out.dtype.element_ty),
            mask=d_mask,
        )

    # `triton.jit` returns an InterpretedFunction instead of a JITFunction when
    # TRITON_INTERPRET=1 was set at decoration time.
    _KERNEL_INTERPRETED = type(_paged_decode_attention_kernel).__name__ == "InterpretedFunction"
else:  # pragma: no cover - exercised only where triton is absent
    _paged_decode_attention_kernel = None
    _KERNEL_INTERPRETED = False


def launch_config(head_dim: int) -> dict[str, int]:
    """Default ``TILE`` / ``num_warps`` / ``num_stages`` for a head dim.

    ``TILE`` (tokens per loop iteration) is independent of ``block_size``: a tile may span
    several KV blocks or part of one. The [TILE, BLOCK_D] K and V tiles are kept at <= 8K
    elements; with 4-8 warps that compiles (sm_80/sm_90, fp16) to ~60-80 registers per
    thread and no spills. The interpreter runs the same tiles, so the CPU tests exercise the
    production configuration.
    """
    block_d = _next_power_of_2(head_dim)
    return {
        "TILE": max(16, min(128, 8192 // block_d)),
        "num_warps": 4 if block_d <= 64 else 8,
        "num_stages": 2,
    }


def _next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def triton_paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    *,
    tile: int | None = None,
    num_warps: int | None = None,
) -> Tensor:
    """Decode attention of one query token per sequence over a paged KV cache.

    Args:
        q: ``[B, H, D]``, one query token per sequence.
        k_cache, v_cache: ``[num_blocks, block_size, H, D]``, same dtype as ``q``.
        block_tables: int ``[B, max_blocks_per_seq]``; entries past a sequence's last block
            may be any valid block id (they are never read).
        context_lens: int ``[B]``, context tokens per sequence including the current one,
            whose K/V are already in the cache. Must be ``<= max_blocks_per_seq * block_size``.
        scale: softmax scale, typically ``head_dim ** -0.5``.
        tile: tuning knob (tests, benchmarks): tokens per kernel loop iteration, a power of two
            >= 2; independent of ``block_size``. Default: ``launch_config(head_dim)``.
        num_warps: tuning knob, warps per program (GPU only). Default: ``launch_config``.

    Returns:
        ``[B, H, D]`` in ``q``'s dtype.
    """
    if not TRITON_AVAILABLE:
        raise RuntimeError(
            "triton_paged_decode_attention needs the `triton` package, which could not be imported "
            f"({_TRITON_IMPORT_ERROR!r}); install triton or use "
            "fastserve.services.worker.attention.paged_decode_attention"
        )
    if q.dim() != 3:
        raise ValueError(f"q must be [B, H, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, H, D], got "
            f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    batch, num_heads, head_dim = q.shape
    _, block_size, cache_heads, cache_dim = k_cache.shape
    if (cache_heads, cache_dim) != (num_heads, head_dim):
        raise ValueError(
            f"cache heads/head_dim {(cache_heads, cache_dim)} do not match q's {(num_heads, head_dim)}"
        )
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {q.dtype}; expected one of {SUPPORTED_DTYPES}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"dtype mismatch: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch:
        raise ValueError(f"block_tables must be [B={batch}, max_blocks], got {tuple(block_tables.shape)}")
    if context_lens.shape != (batch,):
        raise ValueError(f"context_lens must be [B={batch}], got {tuple(context_lens.shape)}")
    if block_tables.dtype.is_floating_point or context_lens.dtype.is_floating_point:
        raise TypeError("block_tables and context_lens must be integer tensors")

    device = q.device
    for name, t in (
        ("k_cache", k_cache),
        ("v_cache", v_cache),
        ("block_tables", block_tables),
        ("context_lens", context_lens),
    ):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, q on {device}")
    interpret = _KERNEL_INTERPRETED
    if device.type == "cpu" and not interpret:
        raise RuntimeError(
            "triton_paged_decode_attention got CPU tensors but the kernel was compiled for a GPU; "
            "set TRITON_INTERPRET=1 before importing fastserve.services.worker.triton_attention to run it on "
            "CPU (slow, for tests), or use fastserve.services.worker.attention.paged_decode_attention"
        )

    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or num_heads == 0 or head_dim == 0:
        return out

    grid, args, constexprs = _launch_args(q, k_cache, v_cache, block_tables, context_lens, out, scale, tile)
    options = {}
    if not interpret:  # the interpreter takes no launch options
        config = launch_config(head_dim)
        options["num_warps"] = num_warps if num_warps is not None else config["num_warps"]
        options["num_stages"] = config["num_stages"]
    if device.type == "cuda":
        with torch.cuda.device(device):  # launch on q's device, not the current one
            _paged_decode_attention_kernel[grid](*args, **constexprs, **options)
    else:
        _paged_decode_attention_kernel[grid](*args, **constexprs, **options)
    return out


def _launch_args(q, k_cache, v_cache, block_tables, context_lens, out, scale, tile=None):
    """Grid, positional args and constexprs of one kernel launch (shared with the compile test)."""
    batch, num_heads, head_dim = q.shape
    if tile is None:
        tile = launch_config(head_dim)["TILE"]
    elif tile < 2 or tile & (tile - 1):
        raise ValueError(f"tile must be a power of two >= 2, got {tile}")
    block_tables = block_tables.to(torch.int32)
    context_lens = context_lens.to(torch.int32).contiguous()
    args = (
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        float(scale) * _LOG2E,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        *block_tables.stride(),
        *out.stride(),
    )
    constexprs = {
        "HEAD_DIM": head_dim,
        "BLOCK_D": _next_power_of_2(head_dim),
        "KV_BLOCK_SIZE": k_cache.shape[1],
        "TILE": tile,
    }
    return (batch, num_heads), args, constexprs
