"""The KV manager's two tiers and its per-iteration plans under each swap policy."""

from __future__ import annotations

import pytest

from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.planner import make_plan


def full_gpu() -> BlockManager:
    """8 GPU blocks of 16 tokens, held by two idle jobs: a (3 blocks) and b (4 blocks)."""
    bm = BlockManager(num_gpu_blocks=8, block_size=16, num_host_blocks=8)
    bm.allocate("a", 40)
    bm.allocate("b", 64)
    return bm


def test_swap_out_and_in_round_trip_moves_every_block():
    bm = full_gpu()
    moves = bm.swap_out("a")
    assert [g for g, _ in moves] == [0, 1, 2] and bm.on_host("a") and bm.num_free == 4
    back = bm.swap_in("a")
    assert [h for h, _ in back] == [h for _, h in moves] and not bm.on_host("a")
    bm.begin_plan()
    assert bm.num_host_free == 8


def test_batch_that_needs_room_evicts_the_job_that_runs_last():
    bm = full_gpu()
    plan = make_plan(bm, [("c", 48)], waiting=[("a", 0.5), ("b", 9.0)], swap_policy="reactive")
    assert plan.swapped_out == ["b"] and len(plan.swap_out) == 4
    assert plan.tables["c"] == sorted(plan.tables["c"]) and len(plan.tables["c"]) == 3
    assert not plan.deferred and bm.on_host("b") and "a" in bm.tables


def test_priority_order_option_is_just_a_different_enst():
    bm = full_gpu()
    plan = make_plan(bm, [("c", 48)], waiting=[("a", 2.0), ("b", 1.0)], swap_policy="reactive")
    assert plan.swapped_out == ["a"] and "b" in bm.tables


def test_recompute_policy_drops_kv_instead_of_swapping():
    bm = full_gpu()
    plan = make_plan(bm, [("c", 48)], waiting=[("a", 0.5), ("b", 9.0)], swap_policy="recompute")
    assert plan.recompute == ["b"] and not plan.swap_out and not bm.on_host("b") and "b" not in bm.tables


def test_full_host_tier_falls_back_to_recompute():
    bm = BlockManager(num_gpu_blocks=8, block_size=16, num_host_blocks=2)
    bm.allocate("a", 40)
    bm.allocate("b", 64)
    plan = make_plan(bm, [("c", 48)], waiting=[("b", 9.0)], swap_policy="proactive")
    assert plan.recompute == ["b"] and not plan.swap_out


def test_scheduled_host_job_is_swapped_in_before_it_grows():
    bm = full_gpu()
    bm.swap_out("a")
    plan = make_plan(bm, [("a", 49)], waiting=[("b", 1.0)], swap_policy="reactive")
    assert plan.swapped_in == ["a"] and len(plan.swap_in) == 3 and len(plan.tables["a"]) == 4


def test_proactive_keeps_a_reserve_then_prefetches_only_when_nothing_left():
    bm = full_gpu()
    plan = make_plan(bm, [("a", 41)], waiting=[("b", 5.0)], swap_policy="proactive", reserve=2)
    assert plan.swapped_out == ["b"] and not plan.prefetch  # 1 block free < reserve 2: b goes
    plan = make_plan(bm, [("a", 42)], waiting=[("b", 5.0)], swap_policy="proactive", reserve=2)
    assert not plan.prefetch  # 5 free - 4 for b would break the reserve
    plan = make_plan(bm, [("a", 42)], waiting=[("b", 5.0)], swap_policy="proactive", reserve=1)
    assert plan.swapped_in == ["b"] and len(plan.prefetch) == 4 and bm.num_free == 1


def test_reactive_never_prefetches_and_unfittable_job_is_deferred():
    bm = full_gpu()
    bm.swap_out("b")
    plan = make_plan(bm, [("a", 41)], waiting=[("b", 0.1)], swap_policy="reactive")
    assert not plan.prefetch and bm.on_host("b")
    plan = make_plan(bm, [("huge", 16 * 9)], waiting=[], swap_policy="reactive")
    assert plan.deferred == ["huge"] and "huge" not in bm.tables


def test_unknown_swap_policy_is_refused():
    with pytest.raises(ValueError, match="swap policy"):
        make_plan(full_gpu(), [], [], swap_policy="lazy")


def test_batch_that_cannot_grow_preempts_its_own_lowest_priority_job():
    bm = BlockManager(num_gpu_blocks=4, block_size=16, num_host_blocks=4)
    bm.allocate("hi", 32)
    bm.allocate("lo", 32)  # the GPU is full and both want one more block
    plan = make_plan(bm, [("hi", 33), ("lo", 33)], waiting=[], swap_policy="reactive")
    assert plan.deferred == ["lo"] and plan.swapped_out == ["lo"] and len(plan.tables["hi"]) == 3


def test_host_blocks_read_by_a_swap_in_are_not_reused_by_the_same_plan():
    bm = BlockManager(num_gpu_blocks=4, block_size=16, num_host_blocks=2)
    bm.allocate("a", 32)
    bm.swap_out("a")  # a's KV in host blocks 0, 1
    bm.allocate("b", 32)
    plan = make_plan(bm, [("a", 33)], waiting=[("b", 1.0)], swap_policy="reactive")
    # a comes back; b must leave, but a's host blocks are still being read: b is recomputed instead
    assert plan.swapped_in == ["a"] and plan.recompute == ["b"] and not plan.swap_out
    make_plan(bm, [], waiting=[])
    assert bm.num_host_free == 2  # released at the next plan


def test_proactive_reserve_swaps_out_but_never_drops_kv():
    bm = BlockManager(num_gpu_blocks=8, block_size=16, num_host_blocks=2)
    bm.allocate("a", 40)  # 3 blocks
    bm.allocate("b", 64)  # 4 blocks: does not fit the 2 host blocks
    plan = make_plan(bm, [("a", 41)], waiting=[("b", 5.0)], swap_policy="proactive", reserve=2)
    assert not plan.recompute and not plan.swapped_out and "b" in bm.tables
    plan = make_plan(bm, [("a", 41), ("c", 32)], waiting=[("b", 5.0)], swap_policy="proactive", reserve=2)
    assert plan.recompute == ["b"] and "c" in plan.tables  # the batch itself may still drop work


def test_proactive_reserve_takes_a_victim_that_fits_the_host_over_a_bigger_one():
    bm = BlockManager(num_gpu_blocks=8, block_size=16, num_host_blocks=3)
    bm.allocate("a", 16)  # 1 block, in the batch
    bm.allocate("big", 64)  # 4 blocks: does not fit the 3 host blocks
    bm.allocate("small", 48)  # 3 blocks: fits
    plan = make_plan(
        bm, [("a", 16)], waiting=[("big", 9.0), ("small", 5.0)], swap_policy="proactive", reserve=3
    )
    assert plan.swapped_out == ["small"] and not plan.recompute and "big" in bm.tables
