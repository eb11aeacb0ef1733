"""The paged KV pool of one rank: its pipeline stage's layers, its TP rank's heads.

Per layer, ``k_cache[layer]`` and ``v_cache[layer]`` are ``[num_blocks, block_size,
num_local_heads, head_dim]``. Token ``t`` of a job whose block table is ``bt`` lives at
``[bt[t // block_size], t % block_size]``, i.e. at flat slot ``bt[t // bs] * bs + t % bs``
of the ``[num_blocks * block_size, heads, head_dim]`` view. Keeping one tensor per
layer (rather than one big tensor) lets swapping move a block id of every layer with
plain index copies.
"""

from __future__ import annotations

import math

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        scratch_blocks: int = 0,
    ) -> None:
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_heads = num_heads
        self.head_dim = head_dim
        # scratch blocks sit past num_blocks, outside what the KV manager hands out: padded rows of a
        # replayed CUDA graph write there (see cuda_graphs.py)
        self.scratch_block = num_blocks if scratch_blocks else None
        shape = (num_blocks + scratch_blocks, block_size, num_heads, head_dim)
        # Zeroed, not empty: the torch attention path multiplies masked-out slots by a zero
        # probability, and 0 * NaN from uninitialised memory would poison the output.
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self._workspace = torch.empty(0, dtype=dtype, device=device)

    def workspace(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A scratch tensor of ``shape`` (contents undefined), reused across layers and steps:
        the torch decode path gathers blocks into it. Grows, never shrinks."""
        numel = math.prod(shape)
        if self._workspace.numel() < numel:
            self._workspace = torch.empty(numel, dtype=self._workspace.dtype, device=self._workspace.device)
        return self._workspace[:numel].view(shape)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Stores ``k``/``v`` ``[T, heads, head_dim]`` at flat slots ``[T]`` (int64) of ``layer``."""
        self.k_cache[layer].view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, k)
        self.v_cache[layer].view(-1, self.num_heads, self.head_dim).index_copy_(0, slots, v)

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        """K and V of one block in every layer of the pool."""
        return 2 * num_layers * block_size * num_heads * head_dim * dtype.itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k_cache, *self.v_cache))
