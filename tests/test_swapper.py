"""The worker's swapper on CPU: blocks survive a round trip through the host pool, in order;
and the bookkeeping of its CUDA timing events, on stand-in events."""

from __future__ import annotations

import torch

from fastserve.services.worker.kv_cache import KVCache
from fastserve.services.worker.swapper import Swapper, finished_seconds, finished_stall_seconds


def filled_cache() -> KVCache:
    cache = KVCache(
        num_layers=2, num_blocks=6, block_size=4, num_heads=2, head_dim=3, dtype=torch.float32, device="cpu"
    )
    for layer in range(2):
        cache.k_cache[layer].copy_(torch.randn(cache.k_cache[layer].shape))
        cache.v_cache[layer].copy_(torch.randn(cache.v_cache[layer].shape))
    return cache


def test_swap_out_then_in_to_other_blocks_restores_contents():
    cache = filled_cache()
    swapper = Swapper(cache, num_host_blocks=4)
    before = [(cache.k_cache[i][[1, 2]].clone(), cache.v_cache[i][[1, 2]].clone()) for i in range(2)]
    swapper.submit(swap_out=[(1, 3), (2, 0)], swap_in=[], prefetch=[])
    swapper.wait_for([1, 2])
    for layer in range(2):  # the freed device blocks get reused and overwritten
        cache.k_cache[layer][[1, 2]] = 0
        cache.v_cache[layer][[1, 2]] = 0
    swapper.submit(swap_out=[], swap_in=[(3, 4)], prefetch=[(0, 5)])
    swapper.wait_for([4, 5])
    for layer in range(2):
        assert torch.equal(cache.k_cache[layer][[4, 5]], before[layer][0])
        assert torch.equal(cache.v_cache[layer][[4, 5]], before[layer][1])
    assert (swapper.stats.blocks_out, swapper.stats.blocks_in) == (2, 2)


def test_swap_out_and_reuse_of_host_block_in_one_submit_keep_order():
    cache = filled_cache()
    swapper = Swapper(cache, num_host_blocks=1)
    swapper.submit(swap_out=[(0, 0)], swap_in=[], prefetch=[])
    expected = cache.k_cache[0][0].clone()
    swapper.submit(swap_out=[], swap_in=[(0, 5)], prefetch=[])  # reads host block 0 after it was written
    swapper.drain()
    assert torch.equal(cache.k_cache[0][5], expected)
    assert swapper.stats.transfer_seconds > 0


class FakeEvent:
    """A CUDA event's query/elapsed_time: `at` ms on the GPU's clock, None while not yet passed."""

    def __init__(self, at: float | None) -> None:
        self.at = at

    def query(self) -> bool:
        return self.at is not None

    def elapsed_time(self, end: FakeEvent) -> float:
        return end.at - self.at


def test_transfer_time_counts_once_the_gpu_has_passed_its_end():
    done, ahead = FakeEvent(5.0), (FakeEvent(6.0), FakeEvent(None))
    seconds, left = finished_seconds([(FakeEvent(2.0), done), ahead])
    assert seconds == 0.003 and left == [ahead]


def test_stall_is_the_wait_for_the_last_transfer_and_never_negative():
    stalls = [
        (FakeEvent(10.0), [FakeEvent(12.0), FakeEvent(14.0)]),  # compute ready at 10, last copy done at 14
        (FakeEvent(20.0), [FakeEvent(15.0)]),  # the copy had finished before compute got there
        (FakeEvent(None), [FakeEvent(30.0)]),  # compute has not reached the wait yet
    ]
    seconds, left = finished_stall_seconds(stalls)
    assert seconds == 0.004 and left == stalls[2:]


def test_a_wide_cpu_swap_starts_no_openmp_team_beside_the_steps():
    """A second OpenMP team anywhere in the worker stops the step's threads spinning (swapper.py):
    a swap of blocks wider than torch's parallel grain adds the swap thread and no other."""
    import os

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache = KVCache(
            num_layers=1,
            num_blocks=2,
            block_size=64,
            num_heads=16,
            head_dim=64,
            dtype=torch.bfloat16,
            device="cpu",
        )
        cache.k_cache[0].copy_(torch.randn(cache.k_cache[0].shape))
        swapper = Swapper(cache, num_host_blocks=1)
        before = len(os.listdir("/proc/self/task"))
        swapper.submit(swap_out=[(0, 0)], swap_in=[], prefetch=[])
        swapper.drain()
        assert len(os.listdir("/proc/self/task")) == before + 1
        swapper.submit(swap_out=[], swap_in=[(0, 1)], prefetch=[])
        swapper.drain()
        assert torch.equal(cache.k_cache[0][1], cache.k_cache[0][0])
    finally:
        torch.set_num_threads(threads)
