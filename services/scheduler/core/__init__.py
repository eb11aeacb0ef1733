"""The scheduling core (pure Python): jobs, policy and KV accounting, shared by the Engine and the simulator."""

from .config import SWAP_POLICIES, CoreConfig, default_reserve
from .core import SchedulerCore
from .enst import EnstEstimator
from .types import CANCELLED, ERROR, LENGTH, STOP, Event, KVPlan, Proposal, Seq, SeqInput, Step

__all__ = [
    "CANCELLED",
    "ERROR",
    "LENGTH",
    "STOP",
    "SWAP_POLICIES",
    "CoreConfig",
    "EnstEstimator",
    "Event",
    "KVPlan",
    "Proposal",
    "SchedulerCore",
    "Seq",
    "SeqInput",
    "Step",
    "default_reserve",
]
