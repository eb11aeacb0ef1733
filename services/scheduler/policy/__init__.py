"""Scheduling policies (pure Python): see base.Policy."""

from .base import BatchLimits, Job, Policy, PolicyConfig, Transition, chunk_tokens, form_batch
from .cost_model import CostModel
from .fcfs import FCFS
from .gittins import Gittins, GittinsSlowdown
from .las import LAS
from .mlfq import MLFQ, SkipJoinMLFQ
from .predicted import PredictedGittins, PredictedOrderMLFQ, PredictedSkipJoinMLFQ, PredictedSRPT
from .srpt import SRPTOracle
from .vllm import VLLM

POLICIES: dict[str, type[Policy]] = {
    "fcfs": FCFS,
    "mlfq": MLFQ,
    "skip-join-mlfq": SkipJoinMLFQ,
    "srpt-oracle": SRPTOracle,
    "las": LAS,
    "gittins": Gittins,
    "gittins-slowdown": GittinsSlowdown,
    "vllm": VLLM,
    "predicted-srpt": PredictedSRPT,
    "predicted-gittins": PredictedGittins,
    "predicted-skip-join-mlfq": PredictedSkipJoinMLFQ,
    "predicted-order-mlfq": PredictedOrderMLFQ,
}


def policy_help() -> str:
    """The registered policies, one clause each, for the --policy flag of the scheduler and `up`."""
    return "; ".join(f"{name}: {cls.summary}" for name, cls in POLICIES.items())


def needs_prediction(policy: str) -> bool:
    """Whether the policy reads Job.predicted_len (and refuses jobs without one)."""
    return policy.startswith("predicted-")


def swap_policy_of(policy: str, requested: str) -> str:
    """The swap policy a run uses: the one a preset fixes (vllm: recompute), else `requested`."""
    return getattr(POLICIES.get(policy), "swap_policy", None) or requested


def make_policy(config: PolicyConfig, cost_model: CostModel | None = None) -> Policy:
    """Builds the policy named in `config`."""
    try:
        cls = POLICIES[config.name]
    except KeyError:
        raise ValueError(f"--policy {config.name!r} is unknown; choose one of {sorted(POLICIES)}") from None
    return cls(config, cost_model)


__all__ = [
    "BatchLimits",
    "CostModel",
    "Job",
    "Policy",
    "PolicyConfig",
    "Transition",
    "chunk_tokens",
    "form_batch",
    "make_policy",
    "policy_help",
    "POLICIES",
    "FCFS",
    "MLFQ",
    "SkipJoinMLFQ",
    "SRPTOracle",
    "LAS",
    "Gittins",
    "GittinsSlowdown",
    "VLLM",
    "PredictedSRPT",
    "PredictedGittins",
    "PredictedSkipJoinMLFQ",
    "PredictedOrderMLFQ",
    "swap_policy_of",
    "needs_prediction",
]
