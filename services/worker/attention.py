"""Attention over the paged KV cache for one iteration's flattened batch.

A step's tokens are laid out decodes first (one query token per job, its context read
back from the cache through the block table), then prefill chunks (several query tokens
per job, causal among themselves, plus the job's cached prefix when ``start_pos > 0``).
`AttentionMetadata` is built once per step and shared by every layer.

Decode attention has one signature on every device: ``paged_decode_attention`` here is
the torch path; on CUDA the Triton kernel in ``triton_attention.py`` is used instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    from .triton_attention import TRITON_AVAILABLE, triton_paged_decode_attention
except Exception:  # noqa: BLE001 - no kernel module (or a broken one): the torch path serves
    TRITON_AVAILABLE = False
    triton_paged_decode_attention = None


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
class AttentionMetadata:
    slot_mapping: Tensor  # int64 [T]: flat cache slot of every token of the step
    num_decodes: int  # tokens [0, num_decodes) are decode queries, one per job
    decode_block_tables: Tensor | None  # int32 [num_decodes, max_blocks], padded with block 0
    decode_context_lens: Tensor | None  # int32 [num_decodes], including the new token
    prefills: list[PrefillChunk]


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float
) -> Tensor:
    """One query token per sequence over its paged context: the torch path.

    Args:
        q: ``[B, H, D]``.
        k_cache, v_cache: ``[num_blocks, block_size, H, D]``.
        block_tables: int ``[B, max_blocks]``; entries past a sequence's last block may be any
            valid block id (their slots are masked out).
        context_lens: int ``[B]``, tokens of context per sequence including the current one.
        scale: softmax scale.

    Returns ``[B, H, D]``. The blocks are gathered with one ``index_select`` per tensor into
    ``[B, max_blocks * block_size, H, D]`` and attended with a masked SDPA; masked slots
    must hold finite values (the KV pool is zero-initialised), since SDPA multiplies them by 0.
    """
    batch, heads, head_dim = q.shape
    block_size = k_cache.shape[1]
    max_blocks = block_tables.shape[1]
    ctx = max_blocks * block_size
    flat = block_tables.reshape(-1)
    k = k_cache.index_select(0, flat).view(batch, ctx, heads, head_dim).transpose(1, 2)
    v = v_cache.index_select(0, flat).view(batch, ctx, heads, head_dim).transpose(1, 2)
    positions = torch.arange(ctx, device=q.device)
    mask = (positions[None, :] < context_lens[:, None].to(positions.dtype))[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=mask, scale=scale)
    return out[:, :, 0, :]


def decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float
) -> Tensor:
    """Dispatch: the Triton kernel for CUDA tensors (when it imports), else the torch path."""
    if q.is_cuda and TRITON_AVAILABLE:
        return triton_paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale)


def prefill_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, chunk: PrefillChunk, scale: float
) -> Tensor:
    """Causal attention of one job's chunk: ``q, k, v`` are ``[n, H, D]``, the chunk's own keys."""
    if chunk.start_pos == 0:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
        )
    else:  # the prefix lives in the cache (this chunk's K/V were just written there too)
        heads, head_dim = q.shape[1:]
        keys = k_cache.view(-1, heads, head_dim).index_select(0, chunk.context_slots)
        values = v_cache.view(-1, heads, head_dim).index_select(0, chunk.context_slots)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1), attn_mask=chunk.mask, scale=scale
        )
    return out.transpose(0, 1)


def paged_attention(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float
) -> Tensor:
    """Attention for every token of the step: ``q, k, v`` ``[T, H, D]`` -> ``[T, H, D]``.

    The step's K/V must already be written to the cache (decodes read themselves from it).
    """
    if not meta.prefills:
        return decode_attention(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale)
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd:
        out[:nd] = decode_attention(
            q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, scale
        )
    for chunk in meta.prefills:
        s, e = chunk.token_start, chunk.token_end
        out[s:e] = prefill_attention(q[s:e], k[s:e], v[s:e], k_cache, v_cache, chunk, scale)
    return out
