"""One iteration's KV plan: block tables for the batch and the swaps that make room. Pure Python.

Swap policies (the paper's comparison):
- proactive: keep `reserve` GPU blocks free by swapping out the waiting jobs that
  will run last (largest ENST), and, when nothing was swapped out this round,
  prefetch the host jobs that will run next (smallest ENST) into spare room;
- reactive: swap out only when the batch itself needs room, swap in only when a
  host job is scheduled;
- recompute: never use the host tier; a job that must give up its blocks drops its
  KV and is rebuilt later from its tokens.
With proactive or reactive, a job falls back to recompute when the host tier is full.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_manager import BlockManager

SWAP_POLICIES = ("proactive", "reactive", "recompute")


@dataclass
class Plan:
    tables: dict[str, list[int]] = field(default_factory=dict)
    deferred: list[str] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # host -> gpu, before compute
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # gpu -> host
    prefetch: list[tuple[int, int]] = field(default_factory=list)  # host -> gpu, background
    swapped_in: list[str] = field(default_factory=list)
    swapped_out: list[str] = field(default_factory=list)
    recompute: list[str] = field(default_factory=list)


def make_plan(
    blocks: BlockManager,
    batch: list[tuple[str, int]],
    waiting: list[tuple[str, float]],
    swap_policy: str = "proactive",
    reserve: int = 0,
) -> Plan:
    """`batch`: (job, tokens it will hold) in priority order; `waiting`: (job, ENST seconds) of idle jobs."""
    if swap_policy not in SWAP_POLICIES:
        raise ValueError(f"swap policy {swap_policy!r} is not one of {SWAP_POLICIES}")
    blocks.begin_plan()
    plan = Plan()
    in_batch = {rid for rid, _ in batch}
    # victims run last: largest ENST first; only idle jobs that hold GPU blocks
    victims = [
        rid for rid, _ in sorted(waiting, key=lambda w: -w[1]) if rid in blocks.tables and rid not in in_batch
    ]

    def evict_one(recompute_ok: bool = True) -> bool:
        """Moves the next victim's KV to the host, or drops it when allowed and the host is full.

        Without `recompute_ok`, the first victim (in eviction order) that fits the host goes.
        """
        if swap_policy != "recompute":
            for index, rid in enumerate(victims if not recompute_ok else victims[:1]):
                moves = blocks.swap_out(rid)
                if moves is not None:
                    plan.swap_out.extend(moves)
                    plan.swapped_out.append(victims.pop(index))
                    return True
        if not recompute_ok or not victims:
            return False
        rid = victims.pop(0)
        blocks.free(rid)
        plan.recompute.append(rid)
        return True

    def make_room(need: int, index: int) -> bool:
        """Idle jobs go first; then the batch's own jobs after `index` (lower priority), which then wait."""
        while blocks.num_free < need:
            if evict_one():
                continue
            holders = [rid for rid in batch_ids[index + 1 :] if rid not in skip and rid in blocks.tables]
            if not holders:
                return False
            victims.append(holders[-1])
            plan.deferred.append(holders[-1])
            skip.add(holders[-1])
        return True

    skip: set[str] = set()
    batch_ids = [rid for rid, _ in batch]
    for index, (rid, num_tokens) in enumerate(batch):
        if rid in skip:
            continue
        if blocks.on_host(rid):
            if not make_room(len(blocks.host_tables[rid]), index):
                plan.deferred.append(rid)
                continue
            plan.swap_in.extend(blocks.swap_in(rid) or [])
            plan.swapped_in.append(rid)
        held = len(blocks.tables.get(rid, []))
        need = -(-num_tokens // blocks.block_size) - held
        if need > 0 and not make_room(need, index):
            plan.deferred.append(rid)
            continue
        plan.tables[rid] = blocks.allocate(rid, num_tokens)

    if swap_policy == "proactive":
        while blocks.num_free < reserve and evict_one(recompute_ok=False):  # a reserve never costs work
            pass
        if not plan.swapped_out:
            for rid, _ in sorted(waiting, key=lambda w: w[1]):
                host = blocks.host_tables.get(rid)
                if host is None or rid in in_batch:
                    continue
                if blocks.num_free - len(host) < reserve:
                    break
                plan.prefetch.extend(blocks.swap_in(rid) or [])
                plan.swapped_in.append(rid)
    return plan
