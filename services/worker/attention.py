"""Attention over the paged KV cache for one iteration's flattened batch.

A step's tokens are laid out decodes first (one query token per job, its context read
back from the cache through the block table), then prefill chunks (several query tokens
per job, causal among themselves, plus the job's cached prefix when ``start_pos > 0``).
`AttentionMetadata` is built once per step and shared by every layer.

Decode attention has one signature on every device: ``paged_decode_attention`` here is
the torch path; on CUDA the Triton kernel in ``triton_attention.py`` is used instead, and on
CPU the C++ kernel of ``cpu_kernels.py`` where the runner built it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

_triton_kernel = None  # resolved on first CUDA call: importing triton costs ~1 s a CPU worker need not pay


def _triton_decode():
    """The Triton decode kernel, or False when it cannot be imported here."""
    global _triton_kernel
    if _triton_kernel is None:
        try:
            from .triton_attention import TRITON_AVAILABLE, triton_paged_decode_attention

            _triton_kernel = triton_paged_decode_attention if TRITON_AVAILABLE else False
        except Exception:  # noqa: BLE001 - no kernel module (or a broken one): the torch path serves
            _triton_kernel = False
    return _triton_kernel


def triton_decode_available() -> bool:
    """Whether CUDA decode attention runs the Triton kernel here (else the torch path)."""
    return bool(_triton_decode())


@dataclass
class PrefillChunk:
    """Query tokens ``[token_start, token_end)`` of the step are positions ``start_pos ...`` of one job."""

    token_start: int
    token_end: int
    start_pos: int
    # Only when start_pos > 0: flat cache slots of positions [0, start_pos + n) and the
    # [n, start_pos + n] boolean mask (query i sees keys j <= start_pos + i).
    context_slots: Tensor | None = None
    mask: Tensor | None = None


@dataclass
class DecodePlan:
    """How the torch decode path walks a step's decodes, worked out once per step for every layer:
    chunks of sequences ``(first, end, flat block ids, additive mask [n, 1, 1, ctx])`` and the
    buffer their blocks are gathered into."""

    chunks: list[tuple[int, int, Tensor, Tensor]]
    workspace: Tensor  # [2, rows, block_size, H, D]: K and V of the largest chunk


@dataclass
class AttentionMetadata:
    slot_mapping: Tensor  # int64 [T]: flat cache slot of every token of the step
    num_decodes: int  # tokens [0, num_decodes) are decode queries, one per job
    decode_block_tables: Tensor | None  # int32 [num_decodes, max_blocks], padded with block 0
    decode_context_lens: Tensor | None  # int32 [num_decodes], including the new token
    prefills: list[PrefillChunk]
    # the torch decode path's plan (built by the first layer that needs it, shared by the rest)
    # and where its workspace comes from: a buffer that outlives the step (see KVCache.workspace)
    decode_plan: DecodePlan | None = None
    workspace: Callable[[tuple[int, ...]], Tensor] | None = None
    # the C++ kernel of cpu_kernels.py, when the runner has it (CPU, fp32, not --enforce-eager):
    # decodes read the pool in place instead of the torch path's gather + SDPA
    cpu_decode: Callable[..., Tensor] | None = None


# The torch decode path gathers each sequence's blocks into a dense buffer that SDPA then
# reads. Done for the whole batch at once, that buffer (2 x batch x context x heads x dim)
# is written out to DRAM and read back; done a few sequences at a time it stays in the CPU
# cache (L2/L3) between the gather and the SDPA, so the KV pool is read from DRAM just once.
# On this 2-core EPYC, OPT-125m decode at batch 16 got ~10% faster at 128 tokens of context
# and ~20% at 512 than with one big gather. Chunks hold at least two sequences: each chunk
# costs a handful of ops, and one sequence per chunk measured 1.5-2x slower when the cores
# were shared with other work (many small multi-threaded ops wait on descheduled threads).
# What does not depend on the layer (the chunks, their block ids and masks) is worked out
# once per step, and the buffer is reused across layers and steps: a fresh multi-MB buffer
# per layer was page-faulted in every time (the allocator hands large blocks back to the OS).
# 16 MiB rather than 4: at the batches the served trace reaches (16-48 sequences of 128-512
# tokens) 4 MiB made chunks of 2-3 sequences, and the ops per chunk cost more than the cache
# saved: the whole OPT-125m decode step went 41 -> 37 ms at batch 16, 83 -> 65 ms at 32 and
# 116 -> 83 ms at 48 (context 200-300; batch 1-4 unchanged), the attention alone at batch 48 /
# context 512 10.2 -> 7.6 ms a layer; 64 MiB was slower again at context 512.
DECODE_CHUNK_BYTES = 16 << 20
MIN_CHUNK_SEQS = 2


def plan_decode(
    k_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    workspace: Callable[[tuple[int, ...]], Tensor] | None = None,
) -> DecodePlan:
    """The chunks of ``paged_decode_attention`` for one step (every layer's pool has ``k_cache``'s shape)."""
    batch = block_tables.shape[0]
    block_size = k_cache.shape[1]
    per_seq = 2 * block_tables.shape[1] * k_cache[0].numel() * k_cache.element_size()
    step = min(batch, max(MIN_CHUNK_SEQS, DECODE_CHUNK_BYTES // per_seq))
    lens = context_lens.tolist()
    chunks = []
    rows = 0
    for s in range(0, batch, step):
        e = min(batch, s + step)
        width = -(-max(lens[s:e]) // block_size)  # this chunk's blocks, not the batch's
        positions = torch.arange(width * block_size, device=k_cache.device)
        mask = torch.zeros((e - s, 1, 1, width * block_size), dtype=k_cache.dtype, device=k_cache.device)
        mask.masked_fill_((positions[None, :] >= context_lens[s:e, None])[:, None, None, :], float("-inf"))
        chunks.append((s, e, block_tables[s:e, :width].reshape(-1), mask))
        rows = max(rows, (e - s) * width)
    shape = (2, rows, *k_cache.shape[1:])
    buffer = workspace(shape) if workspace is not None else k_cache.new_empty(shape)
    return DecodePlan(chunks, buffer)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    plan: DecodePlan | None = None,
) -> Tensor:
    """One query token per sequence over its paged context: the torch path.

    Args:
        q: ``[B, H, D]``.
        k_cache, v_cache: ``[num_blocks, block_size, H, D]``.
        block_tables: int ``[B, max_blocks]``; entries past a sequence's last block may be any
            valid block id (their slots are masked out).
        context_lens: int ``[B]``, tokens of context per sequence including the current one.
        scale: softmax scale.
        plan: `plan_decode` of these tables, shared by the step's layers (made here if None).

    Returns ``[B, H, D]``. Blocks are gathered with ``index_select`` into
    ``[b, max_blocks * block_size, H, D]`` buffers, a few sequences at a time (see
    ``DECODE_CHUNK_BYTES``), and attended with a masked SDPA. Masked slots must hold finite
    values (the KV pool is zero-initialised): SDPA multiplies them by a zero probability.
    """
    if plan is None:
        plan = plan_decode(k_cache, block_tables, context_lens)
    heads, head_dim = q.shape[1:]
    out = torch.empty_like(q)
    for s, e, flat, mask in plan.chunks:
        n = flat.numel()
        k = torch.index_select(k_cache, 0, flat, out=plan.workspace[0, :n])
        v = torch.index_select(v_cache, 0, flat, out=plan.workspace[1, :n])
        k = k.view(e - s, -1, heads, head_dim).transpose(1, 2)
        v = v.view(e - s, -1, heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(q[s:e, :, None, :], k, v, attn_mask=mask, scale=scale)
        out[s:e] = attended[:, :, 0, :]
    return out


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """Dispatch: the Triton kernel for CUDA tensors (when it imports), else the torch path."""
    tables, lens = meta.decode_block_tables, meta.decode_context_lens
    if q.is_cuda and (kernel := _triton_decode()):
        return kernel(q, k_cache, v_cache, tables, lens, scale)
    if meta.cpu_decode is not None:
        return meta.cpu_decode(q, k_cache, v_cache, tables, lens, scale)
    if meta.decode_plan is None:
        meta.decode_plan = plan_decode(k_cache, tables, lens, meta.workspace)
    return paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, meta.decode_plan)


def _heads_first(x: Tensor) -> Tensor:
    """``[n, H, D]`` -> ``[1, H, n, D]`` (a view). SDPA's fused CPU kernel takes only 4-D inputs;
    3-D ones fall back to the unfused math path, ~2x slower on a 512-token prefill."""
    return x.transpose(0, 1)[None]


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, chunk: PrefillChunk, scale: float
) -> Tensor:
    """Causal attention of one job's chunk: ``q, k, v`` are ``[n, H, D]``, the chunk's own keys."""
    if chunk.start_pos == 0:
        out = F.scaled_dot_product_attention(
            _heads_first(q), _heads_first(k), _heads_first(v), is_causal=True, scale=scale
        )
    else:  # the prefix lives in the cache (this chunk's K/V were just written there too)
        heads, head_dim = q.shape[1:]
        keys = k_cache.view(-1, heads, head_dim).index_select(0, chunk.context_slots)
        values = v_cache.view(-1, heads, head_dim).index_select(0, chunk.context_slots)
        out = F.scaled_dot_product_attention(
            _heads_first(q), _heads_first(keys), _heads_first(values), attn_mask=chunk.mask, scale=scale
        )
    return out[0].transpose(0, 1)


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """Attention for every token of the step: ``q, k, v`` ``[T, H, D]`` -> ``[T, H, D]``.

    The step's K/V must already be written to the cache (decodes read themselves from it).
    """
    if not meta.prefills:
        return decode_attention(q, k_cache, v_cache, meta, scale)
    nd = meta.num_decodes
    if nd == 0 and len(meta.prefills) == 1:
        return prefill_attention(q, k, v, k_cache, v_cache, meta.prefills[0], scale)
    out = torch.empty_like(q)
    if nd:
        out[:nd] = decode_attention(q[:nd], k_cache, v_cache, meta, scale)
    for chunk in meta.prefills:
        s, e = chunk.token_start, chunk.token_end
        out[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache, chunk, scale)
    return out
