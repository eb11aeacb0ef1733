"""Paged KV bookkeeping over two tiers: GPU blocks and host blocks. Pure Python.

A job's KV lives wholly in one tier (or nowhere: new, or dropped for recompute).
On the GPU its table covers every position of its context; position p lives in
block table[p // block_size]. Every operation is all-or-nothing, so a job that
cannot get its blocks is left exactly as it was and simply waits.
"""

from __future__ import annotations


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, size: int) -> None:
        self.size = size
        self.free: list[int] = list(range(size - 1, -1, -1))  # pop() hands out low ids first
        self.settling: list[int] = []

    def take(self, n: int) -> list[int]:
        assert n <= len(self.free)
        return [self.free.pop() for _ in range(n)]

    def give(self, blocks: list[int]) -> None:
        self.free.extend(reversed(blocks))

    def give_later(self, blocks: list[int]) -> None:
        """Free only after `settle()`: something queued in this plan still reads them."""
        self.settling.extend(blocks)

    def settle(self) -> None:
        self.give(self.settling)
        self.settling = []


class BlockManager:
    def __init__(self, num_gpu_blocks: int, block_size: int, num_host_blocks: int = 0) -> None:
        if num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be >= 1, got {num_gpu_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.block_size = block_size
        self.gpu = BlockPool(num_gpu_blocks)
        self.host = BlockPool(num_host_blocks)
        self.tables: dict[str, list[int]] = {}  # GPU tier
        self.host_tables: dict[str, list[int]] = {}

    @property
    def num_gpu_blocks(self) -> int:
        return self.gpu.size

    @property
    def num_free(self) -> int:
        return len(self.gpu.free)

    @property
    def num_host_free(self) -> int:
        return len(self.host.free)

    def on_host(self, request_id: str) -> bool:
        return request_id in self.host_tables

    def allocate(self, request_id: str, num_tokens: int) -> list[int] | None:
        """Grows the job's GPU table to cover `num_tokens`; None (and no change) when short of blocks."""
        assert request_id not in self.host_tables, "swap a job in before growing it"
        table = self.tables.get(request_id, [])
        need = blocks_for(num_tokens, self.block_size) - len(table)
        if need > self.num_free:
            return None
        if need > 0:
            table = table + self.gpu.take(need)
        self.tables[request_id] = table
        return table

    def swap_out(self, request_id: str) -> list[tuple[int, int]] | None:
        """Moves the job's blocks to the host tier: (gpu, host) copies; None when the host tier is full."""
        table = self.tables.get(request_id, [])
        if not table or len(table) > self.num_host_free:
            return None
        host = self.host.take(len(table))
        self.gpu.give(self.tables.pop(request_id))
        self.host_tables[request_id] = host
        return list(zip(table, host, strict=True))

    def swap_in(self, request_id: str) -> list[tuple[int, int]] | None:
        """Brings the job's blocks back to the GPU: (host, gpu) copies; None when short of GPU blocks."""
        host = self.host_tables.get(request_id)
        if host is None or len(host) > self.num_free:
            return None
        gpu = self.gpu.take(len(host))
        # Workers run a step's swap-outs before its swap-ins; a swap-out into these host blocks
        # in the same plan would overwrite them before they are read. They free at the next plan.
        self.host.give_later(self.host_tables.pop(request_id))
        self.tables[request_id] = gpu
        return list(zip(host, gpu, strict=True))

    def begin_plan(self) -> None:
        self.host.settle()

    def free(self, request_id: str) -> int:
        """Returns the job's blocks of both tiers to their pools; how many GPU blocks were freed."""
        self.host.give(self.host_tables.pop(request_id, []))
        table = self.tables.pop(request_id, [])
        self.gpu.give(table)
        return len(table)
