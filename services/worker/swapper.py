"""Moves KV blocks between this rank's device pool and its host pool, behind compute.

Transfers run in submission order on their own CUDA stream (GPU) or on one
background thread (CPU). Every device block a pending transfer touches is
remembered; before a step computes, it waits only for the transfers that touch
the blocks its batch uses, so everything else (proactive swap-outs, prefetches)
overlaps with compute. Time spent waiting is "exposed" swap time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .kv_cache import KVCache


@dataclass
class SwapStats:
    blocks_out: int = 0
    blocks_in: int = 0
    transfer_seconds: float = 0.0
    exposed_seconds: float = 0.0


class Swapper:
    def __init__(self, cache: KVCache, num_host_blocks: int) -> None:
        self.cache = cache
        self.num_host_blocks = num_host_blocks
        device = cache.k_cache[0].device if cache.k_cache else torch.device("cpu")
        self.cuda = device.type == "cuda"
        shape = (num_host_blocks, cache.block_size, cache.num_heads, cache.head_dim)
        dtype = cache.k_cache[0].dtype if cache.k_cache else torch.float32
        self.host_k = [torch.empty(shape, dtype=dtype, pin_memory=self.cuda) for _ in cache.k_cache]
        self.host_v = [torch.empty(shape, dtype=dtype, pin_memory=self.cuda) for _ in cache.v_cache]
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self.thread = None if self.cuda else ThreadPoolExecutor(max_workers=1, thread_name_prefix="swap")
        self.pending: dict[int, torch.cuda.Event | Future] = {}
        self.stats = SwapStats()
        self._lock = threading.Lock()

    def submit(
        self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]], prefetch: list[tuple[int, int]]
    ) -> None:
        """Queues (device, host) swap-outs, then (host, device) swap-ins and prefetches, in that order."""
        if swap_out:
            self._enqueue(lambda: self._copy_out(swap_out), [d for d, _ in swap_out])
            self.stats.blocks_out += len(swap_out)
        moves_in = swap_in + prefetch
        if moves_in:
            self._enqueue(lambda: self._copy_in(moves_in), [d for _, d in moves_in])
            self.stats.blocks_in += len(moves_in)

    def wait_for(self, device_blocks: Iterable[int]) -> float:
        """Blocks until the transfers touching `device_blocks` are done; returns the seconds waited."""
        started = time.perf_counter()
        waits = {id(h): h for b in device_blocks if (h := self.pending.get(b)) is not None}
        for handle in waits.values():
            if self.cuda:
                torch.cuda.current_stream().wait_event(handle)
            else:
                handle.result()
        waited = time.perf_counter() - started
        self.stats.exposed_seconds += waited
        return waited

    def drain(self) -> None:
        """Waits for every queued transfer (tests, shutdown)."""
        self.wait_for(list(self.pending))
        if self.cuda:
            self.stream.synchronize()

    def _enqueue(self, copy, device_blocks: list[int]) -> None:
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())  # earlier compute is done with these blocks
            with torch.cuda.stream(self.stream):
                started = time.perf_counter()
                copy()
                handle = torch.cuda.Event()
                handle.record(self.stream)
                self.stats.transfer_seconds += time.perf_counter() - started  # launch time; see docs
        else:
            handle = self.thread.submit(self._timed, copy)
        for block in device_blocks:
            self.pending[block] = handle

    def _timed(self, copy) -> None:
        started = time.perf_counter()
        copy()
        with self._lock:
            self.stats.transfer_seconds += time.perf_counter() - started

    def _copy_out(self, moves: list[tuple[int, int]]) -> None:
        # block by block into pinned host memory, so the device copies stay asynchronous on GPU
        for layer in range(len(self.host_k)):
            k, v = self.cache.k_cache[layer], self.cache.v_cache[layer]
            for dev, host in moves:
                self.host_k[layer][host].copy_(k[dev], non_blocking=True)
                self.host_v[layer][host].copy_(v[dev], non_blocking=True)

    def _copy_in(self, moves: list[tuple[int, int]]) -> None:
        for layer in range(len(self.host_k)):
            k, v = self.cache.k_cache[layer], self.cache.v_cache[layer]
            for host, dev in moves:
                k[dev].copy_(self.host_k[layer][host], non_blocking=True)
                v[dev].copy_(self.host_v[layer][host], non_blocking=True)
