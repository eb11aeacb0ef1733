"""Moves KV blocks between this rank's device pool and its host pool, behind compute.

Transfers run in submission order on their own CUDA stream (GPU) or on one
background thread (CPU). Every device block a pending transfer touches is
remembered; before a step computes, it waits only for the transfers that touch
the blocks its batch uses, so everything else (proactive swap-outs, prefetches)
overlaps with compute. Time spent waiting is "exposed" swap time.

On CPU both times are wall times of the swap thread and of the wait. On GPU neither is a
CPU time (launching a copy or a stream wait returns at once): CUDA events time each transfer
on the swap stream, and a stall of compute from the moment its stream reached the wait to
the end of the last transfer it waits for. They are added to the stats once the GPU has
passed them (``totals``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
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
        self._copy = _block_copy if self.cuda else _copy_on_this_thread
        self.pending: dict[int, torch.cuda.Event | Future] = {}
        self.stats = SwapStats()
        self._lock = threading.Lock()
        # CUDA: timing events not yet passed by the GPU; (start, done) on the swap stream, and
        # (compute ready, the dones it waited for)
        self._transfers: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._stalls: list[tuple[torch.cuda.Event, list[torch.cuda.Event]]] = []

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

    def wait_for(self, device_blocks: Iterable[int]) -> None:
        """Makes compute wait for the transfers touching `device_blocks` (on CPU: blocks until
        they are done); the wait is exposed swap time."""
        waits = {id(h): h for b in device_blocks if (h := self.pending.get(b)) is not None}
        if self.cuda:
            dones = [h for h in waits.values() if not h.query()]  # finished ones cannot stall the GPU
            if dones:
                compute = torch.cuda.current_stream()
                self._stalls.append((_timing_event(compute), dones))
                for done in dones:
                    compute.wait_event(done)
            return
        started = time.perf_counter()
        for handle in waits.values():
            handle.result()
        self.stats.exposed_seconds += time.perf_counter() - started

    def totals(self) -> tuple[float, float]:
        """(transfer, exposed) seconds so far; on CUDA, of what the GPU has already passed."""
        if self.cuda:
            seconds, self._transfers = finished_seconds(self._transfers)
            self.stats.transfer_seconds += seconds
            seconds, self._stalls = finished_stall_seconds(self._stalls)
            self.stats.exposed_seconds += seconds
        return self.stats.transfer_seconds, self.stats.exposed_seconds

    def drain(self) -> None:
        """Waits for every queued transfer (tests, shutdown)."""
        self.wait_for(list(self.pending))
        if self.cuda:
            self.stream.synchronize()

    def _enqueue(self, copy, device_blocks: list[int]) -> None:
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream())  # earlier compute is done with these blocks
            with torch.cuda.stream(self.stream):
                start = _timing_event(self.stream)
                copy()
                handle = _timing_event(self.stream)
            self._transfers.append((start, handle))
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
        copy = self._copy
        for layer in range(len(self.host_k)):
            k, v = self.cache.k_cache[layer], self.cache.v_cache[layer]
            for dev, host in moves:
                copy(self.host_k[layer][host], k[dev])
                copy(self.host_v[layer][host], v[dev])

    def _copy_in(self, moves: list[tuple[int, int]]) -> None:
        copy = self._copy
        for layer in range(len(self.host_k)):
            k, v = self.cache.k_cache[layer], self.cache.v_cache[layer]
            for host, dev in moves:
                copy(k[dev], self.host_k[layer][host])
                copy(v[dev], self.host_v[layer][host])


def _block_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src, non_blocking=True)


def _copy_on_this_thread(dst: torch.Tensor, src: torch.Tensor) -> None:
    """A CPU block copy that starts no OpenMP team. torch copies a block larger than its grain
    size (32K elements: a block of any model wider than OPT-125m) in a parallel region, which on
    the swap thread makes a second OpenMP team in the worker. libgomp then counts more threads
    than CPUs and stops letting the step's threads spin between parallel regions, for the rest of
    the process: each of a decode step's ~170 regions wakes a sleeping thread (a 22 ms step took
    33 ms on the 2-core machine). numpy's copy is a plain memcpy on the calling thread."""
    np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())


def _timing_event(stream: torch.cuda.Stream) -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record(stream)
    return event


def finished_seconds(spans: list) -> tuple[float, list]:
    """Seconds between the (start, end) event pairs the GPU has passed, and the pairs still ahead."""
    seconds, ahead = 0.0, []
    for start, end in spans:
        if end.query():
            seconds += start.elapsed_time(end) / 1e3
        else:
            ahead.append((start, end))
    return seconds, ahead


def finished_stall_seconds(stalls: list) -> tuple[float, list]:
    """For each (ready, dones) the GPU has passed: how long compute, at `ready`, waited for the last
    of `dones` (0 when they had finished by then); their sum, and the stalls still ahead."""
    seconds, ahead = 0.0, []
    for ready, dones in stalls:
        if ready.query() and all(done.query() for done in dones):
            seconds += max(0.0, *(ready.elapsed_time(done) for done in dones)) / 1e3
        else:
            ahead.append((ready, dones))
    return seconds, ahead
