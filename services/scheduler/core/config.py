"""What the scheduling core needs to know about the deployment, and the defaults, each defined once."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..policy import BatchLimits

SWAP_POLICIES = ("proactive", "reactive", "recompute")
RESERVE_FRACTION = 20  # proactive swapping keeps 1/20 (5 %) of the GPU pool free by default


def default_reserve(num_gpu_blocks: int) -> int:
    """The proactive reserve when none is given: 5 % of the GPU pool, rounded up."""
    return -(-num_gpu_blocks // RESERVE_FRACTION)


@dataclass(frozen=True)
class CoreConfig:
    """Limits and KV capacity. `swap_policy` "none" (simulator only): no host tier, no eviction."""

    num_gpu_blocks: int
    num_host_blocks: int = 0
    limits: BatchLimits = field(default_factory=BatchLimits)
    block_size: int = 16
    swap_policy: str = "proactive"
    reserve_blocks: int = -1  # -1: default_reserve(num_gpu_blocks)
    pp_size: int = 1
    # schedule a job's next step while its current one runs (the worker keeps its last token);
    # only without pipeline parallelism, where one batch's jobs are the next batch's
    overlap: bool = False
    eos_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.swap_policy not in (*SWAP_POLICIES, "none"):
            raise ValueError(f"swap_policy {self.swap_policy!r} is not one of {', '.join(SWAP_POLICIES)}")
        if self.pp_size < 1:
            raise ValueError(f"pp_size must be >= 1, got {self.pp_size}")

    @property
    def reserve(self) -> int:
        return self.reserve_blocks if self.reserve_blocks >= 0 else default_reserve(self.num_gpu_blocks)

    @property
    def host_blocks(self) -> int:
        """Host blocks the KV manager uses: none when jobs never swap (recompute, none)."""
        return 0 if self.swap_policy in ("recompute", "none") else self.num_host_blocks

    @property
    def slots(self) -> int:
        """Steps in flight at once: one per pipeline stage, plus the overlapped next step."""
        return self.pp_size + (1 if self.overlap and self.pp_size == 1 else 0)
