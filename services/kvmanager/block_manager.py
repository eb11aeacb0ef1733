"""Paged KV bookkeeping: which GPU blocks each job holds. Pure Python.

A job's block table covers every position of its context; position p lives in
block table[p // block_size]. Allocation is all-or-nothing per job so a job that
cannot get its blocks is left exactly as it was and simply waits.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockManager:
    def __init__(self, num_gpu_blocks: int, block_size: int) -> None:
        if num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {num_gpu_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.free_gpu: list[int] = list(range(num_gpu_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.tables: dict[str, list[int]] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_gpu)

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grows the job's table to cover `num_tokens`; None (and no change) when short of blocks."""
        table = self.tables.get(request_id, [])
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need > len(self.free_gpu):
            return None
        if need > 0:
            table = table + [self.free_gpu.pop() for _ in range(need)]
        self.tables[request_id] = table
        return table

    def free(self, request_id: str) -> int:
        """Returns the job's blocks to the pool; how many were freed."""
        table = self.tables.pop(request_id, [])
        self.free_gpu.extend(reversed(table))
        return len(table)
