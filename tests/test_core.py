"""The scheduling core in-process: batches, KV round trips only when needed, preemption, abort, overlap."""

from __future__ import annotations

import pytest

from fastserve.services.kvmanager.block_manager import BlockManager
from fastserve.services.kvmanager.planner import make_plan
from fastserve.services.scheduler.core import CoreConfig, KVPlan, SchedulerCore
from fastserve.services.scheduler.policy import BatchLimits, CostModel, PolicyConfig, make_policy

EOS = 2


def make_core(policy: str = "fcfs", batch: int = 4, gpu: int = 64, host: int = 0, **kw) -> SchedulerCore:
    cost = CostModel(c0=0.01, c_prefill=0.001)
    knobs = PolicyConfig(name=policy, base_quantum=0.02, num_queues=4)
    config = CoreConfig(
        num_gpu_blocks=gpu,
        num_host_blocks=host,
        limits=BatchLimits(batch),
        block_size=4,
        eos_token_id=EOS,
        reserve_blocks=0,
        **kw,
    )
    return SchedulerCore(config, make_policy(knobs, cost))


class KV:
    """The KV manager's planner in-process, answering the core as the service would."""

    def __init__(self, core: SchedulerCore) -> None:
        c = core.config
        self.core = core
        self.blocks = BlockManager(c.num_gpu_blocks, c.block_size, c.host_blocks)
        self.plans = 0

    def free(self) -> None:
        """What a free request on the plan stream does: free, and tell the core the counts."""
        for rid in self.core.take_frees():
            self.blocks.free(rid)
        self.core.observe_free(self.blocks.num_free, self.blocks.num_host_free)

    def plan(self, proposal) -> KVPlan | None:
        if not proposal.plan:
            return None
        self.plans += 1
        cfg = self.core.config
        p = make_plan(self.blocks, proposal.demands, proposal.waiting, cfg.swap_policy, cfg.reserve)
        return KVPlan(
            p.tables,
            p.swapped_in,
            p.swapped_out,
            p.recompute,
            self.blocks.num_free,
            self.blocks.num_host_free,
        )


def step(core: SchedulerCore, kv: KV, now: float):
    kv.free()
    proposal = core.schedule(now)
    return None if proposal is None else core.launch(proposal, kv.plan(proposal), now)


def kinds(core: SchedulerCore) -> list[tuple[str, str]]:
    return [(e.kind, e.seq.request_id) for e in core.take_events()]


def test_jobs_run_to_their_length_and_the_kv_manager_is_asked_only_for_new_blocks():
    core = make_core()
    kv = KV(core)
    core.add("a", [5, 6, 7], max_tokens=6, now=0.0)
    tokens = []
    for i in range(6):
        s = step(core, kv, float(i))
        assert [x.seq.request_id for x in s.inputs] == ["a"]
        core.complete(s, [10 + i], 0.01, float(i))
        tokens += [e.value for e in core.take_events() if e.kind == "token"]
    assert tokens == [10, 11, 12, 13, 14, 15]
    assert "a" not in core.seqs and core.take_frees() == ["a"]
    # contexts 3..8 tokens in blocks of 4: the plan for the prompt also gives the block after it
    assert kv.plans == 1


def test_a_plan_gives_every_job_its_next_block_so_staggered_jobs_ask_once_a_block():
    core = make_core(batch=8, gpu=64)
    kv = KV(core)
    for i in range(8):  # prompts of 1..8 tokens: every step some job crosses into a new block
        core.add(f"j{i}", list(range(5, 6 + i)), max_tokens=40, now=0.0)
    for i in range(24):
        s = step(core, kv, float(i))
        assert len(s.inputs) == 8
        for x in s.inputs:  # every job holds the blocks of the tokens its step writes
            assert 4 * len(x.seq.table) >= x.start_pos + len(x.token_ids)
        core.complete(s, [10] * 8, 0.01, float(i))
    # without blocks ahead each of the 24 steps would ask (a job crosses every step); with them,
    # a step asks once the first job has used up its block ahead: at most every 4 (block) steps
    assert kv.plans <= 24 // 4 + 1


def test_blocks_ahead_stop_at_the_last_token_and_when_the_pool_is_short():
    core = make_core(gpu=64)
    kv = KV(core)
    core.add("short", [5, 6, 7], max_tokens=1, now=0.0)  # 3 + 1 tokens: one block, none ahead
    step(core, kv, 0.0)
    assert len(kv.blocks.tables["short"]) == 1
    tight = make_core(gpu=3)  # the prompt takes 2 blocks, the last one free is left to the next job
    kv = KV(tight)
    tight.add("a", [5, 6, 7, 8, 9], max_tokens=20, now=0.0)
    tight.add("b", [5], max_tokens=20, now=0.0)
    step(tight, kv, 0.0)
    assert len(kv.blocks.tables["a"]) == 2 and len(kv.blocks.tables["b"]) == 1


def test_first_step_prefills_the_prompt_then_decodes_the_last_token():
    core = make_core()
    kv = KV(core)
    core.add("a", [5, 6, 7], max_tokens=3, now=0.0)
    first = step(core, kv, 0.0)
    assert (first.inputs[0].token_ids, first.inputs[0].start_pos, first.inputs[0].prefill) == (
        [5, 6, 7],
        0,
        True,
    )
    core.complete(first, [9], 0.01, 0.0)
    second = step(core, kv, 0.0)
    assert (second.inputs[0].token_ids, second.inputs[0].start_pos, second.inputs[0].sample_index) == (
        [9],
        3,
        1,
    )
    assert (first.prefill_tokens, second.decode_seqs, second.context_tokens) == (3, 1, 4)


def test_eos_stops_unless_ignored():
    core = make_core()
    kv = KV(core)
    core.add("a", [5], max_tokens=10, now=0.0)
    core.add("b", [5], max_tokens=10, now=0.0, ignore_eos=True)
    s = step(core, kv, 0.0)
    core.complete(s, [EOS, EOS], 0.01, 0.0)
    finished = {e.seq.request_id: e.seq.finish_reason for e in core.take_events() if e.kind == "finished"}
    assert finished == {"a": "stop"} and "b" in core.seqs


def test_a_higher_priority_arrival_preempts_at_the_iteration_boundary():
    core = make_core("skip-join-mlfq", batch=1)
    kv = KV(core)
    core.add("long", [1] * 3, max_tokens=100, now=0.0)
    for i in range(3):
        core.complete(step(core, kv, float(i)), [7], 0.05, float(i))  # demoted past Q0
    core.take_events()
    core.add("short", [1] * 3, max_tokens=2, now=3.0)
    s = step(core, kv, 3.0)
    assert [x.seq.request_id for x in s.inputs] == ["short"]
    assert ("preempted", "long") in kinds(core)
    assert core.seqs["long"].job.preemptions == 1 and core.seqs["long"].state == "preempted"


def test_abort_while_in_flight_finishes_when_the_step_comes_back():
    core = make_core()
    kv = KV(core)
    core.add("a", [5], max_tokens=10, now=0.0)
    s = step(core, kv, 0.0)
    core.take_events()
    assert core.abort("a") is True
    assert "a" in core.seqs and core.take_events() == []  # still in flight
    assert step(core, kv, 0.0) is None  # an aborting job is never launched again
    core.complete(s, [9], 0.01, 0.0)
    assert kinds(core)[-1] == ("finished", "a") and core.take_frees() == ["a"]
    assert core.abort("a") is False


def test_kv_dropped_by_the_plan_means_a_full_prefill_of_prompt_and_generated_tokens():
    core = make_core("skip-join-mlfq", batch=1, gpu=4, swap_policy="recompute")
    kv = KV(core)
    core.add("old", [1] * 4, max_tokens=50, now=0.0)
    for i in range(4):  # 4 + 4 tokens: 2 blocks; demoted past Q0
        core.complete(step(core, kv, float(i)), [20 + i], 0.05, float(i))
    core.add("new", [1] * 4, max_tokens=6, now=5.0)
    for _ in range(6):  # new grows to 9 tokens at its 6th step: a third block, which only old can give
        s = step(core, kv, 5.0)
        assert [x.seq.request_id for x in s.inputs] == ["new"]
        core.complete(s, [7], 0.01, 5.0)
    events = kinds(core)
    assert ("recomputed", "old") in events and ("finished", "new") in events
    again = step(core, kv, 6.0)
    (item,) = again.inputs
    assert item.seq.request_id == "old" and item.prefill
    assert item.token_ids == [1] * 4 + [20, 21, 22, 23] and item.sample_index == 4


def test_pipeline_slots_take_disjoint_batches():
    core = make_core(batch=1, pp_size=2)
    kv = KV(core)
    core.add("a", [1], max_tokens=5, now=0.0)
    core.add("b", [1], max_tokens=5, now=0.0)
    first, second = step(core, kv, 0.0), step(core, kv, 0.0)
    assert [first.inputs[0].seq.request_id, second.inputs[0].seq.request_id] == ["a", "b"]
    assert step(core, kv, 0.0) is None  # both in flight
    core.complete(first, [5], 0.01, 0.0)
    assert step(core, kv, 0.0).inputs[0].seq.request_id == "a"


def test_overlap_schedules_the_next_step_before_the_tokens_are_back():
    core = make_core(overlap=True)
    kv = KV(core)
    core.add("a", [5, 6], max_tokens=3, now=0.0)
    one = step(core, kv, 0.0)
    two = step(core, kv, 0.0)  # a's token from `one` is still in flight
    (item,) = two.inputs
    assert item.token_ids == [] and item.start_pos == 2 and item.sample_index == 1 and not item.prefill
    three = step(core, kv, 0.0)
    assert three is None  # at most one step ahead
    core.complete(one, [7], 0.01, 0.0)
    three = step(core, kv, 0.0)
    assert three.inputs[0].sample_index == 2
    assert step(core, kv, 0.0) is None  # three launches are all of max_tokens: no fourth
    core.complete(two, [8], 0.01, 0.0)
    core.complete(three, [9], 0.01, 0.0)
    assert [e.value for e in core.take_events() if e.kind == "token"] == [7, 8, 9]


def test_a_token_sampled_after_the_last_one_is_never_emitted():
    core = make_core(overlap=True)
    kv = KV(core)
    core.add("a", [5], max_tokens=10, now=0.0)
    one = step(core, kv, 0.0)
    two = step(core, kv, 0.0)
    core.complete(one, [EOS], 0.01, 0.0)  # a finished: `two` is already running
    core.complete(two, [42], 0.01, 0.0)
    events = core.take_events()
    assert [e.value for e in events if e.kind == "token"] == [EOS]
    assert [e.kind for e in events][-1] == "finished" and events[-1].seq.generated == [EOS]


def test_forget_kv_and_requeue_make_every_job_recompute():
    core = make_core()
    kv = KV(core)
    core.add("a", [5, 6], max_tokens=10, now=0.0)
    core.complete(step(core, kv, 0.0), [7], 0.01, 0.0)
    lost = step(core, kv, 0.0)
    core.requeue(lost)  # its workers died: the token in flight is gone
    core.forget_kv(64, 0)
    seq = core.seqs["a"]
    assert seq.job.num_generated == 1 and seq.job.needs_prefill and not seq.holds_kv
    kv = KV(core)  # a new KV manager
    again = step(core, kv, 0.0)
    assert again.inputs[0].token_ids == [5, 6, 7] and again.inputs[0].sample_index == 1


def test_restored_job_prefills_the_tokens_it_had():
    core = make_core()
    kv = KV(core)
    core.add("a", [5, 6], max_tokens=4, now=0.0, generated=[7, 8])
    s = step(core, kv, 0.0)
    assert s.inputs[0].token_ids == [5, 6, 7, 8] and s.inputs[0].sample_index == 2
    core.complete(s, [9], 0.01, 0.0)
    core.complete(step(core, kv, 0.0), [10], 0.01, 0.0)
    assert core.take_events()[-1].seq.generated == [7, 8, 9, 10]


@pytest.mark.parametrize("swap_policy", ["proactive", "reactive"])
def test_swapped_out_job_comes_back_through_a_plan(swap_policy):
    core = make_core("skip-join-mlfq", batch=1, gpu=3, host=8, swap_policy=swap_policy)
    kv = KV(core)
    core.add("old", [1] * 4, max_tokens=50, now=0.0)
    for i in range(4):
        core.complete(step(core, kv, float(i)), [20 + i], 0.05, float(i))
    core.add("new", [1] * 8, max_tokens=1, now=5.0)
    s = step(core, kv, 5.0)
    assert [x.seq.request_id for x in s.inputs] == ["new"] and core.seqs["old"].on_host
    core.complete(s, [3], 0.01, 5.0)
    plans = kv.plans
    back = step(core, kv, 6.0)
    assert back.inputs[0].seq.request_id == "old" and not back.inputs[0].prefill
    assert kv.plans == plans + 1 and not core.seqs["old"].on_host


def test_only_completed_jobs_teach_a_policy_their_length():
    """Gittins learns output lengths: a cancelled or failed job's length is where it was cut off."""
    core = make_core("gittins", batch=4)
    kv = KV(core)
    core.add("done", [5], max_tokens=2, now=0.0)
    core.add("stopped", [5], max_tokens=9, now=0.0)
    core.add("cancelled", [5], max_tokens=9, now=0.0)
    core.add("failed", [5], max_tokens=9, now=0.0)
    for i in range(2):
        s = step(core, kv, float(i))
        core.complete(
            s, [EOS if x.seq.request_id == "stopped" and i else 7 for x in s.inputs], 0.01, float(i)
        )
    core.abort("cancelled")
    core.abort("failed", "error")
    finished = {e.seq.request_id: e.seq.finish_reason for e in core.take_events() if e.kind == "finished"}
    assert finished == {"done": "length", "stopped": "stop", "cancelled": "cancelled", "failed": "error"}
    assert core.policy.num_finished == 2 and list(core.policy.finished) == [2, 2]
