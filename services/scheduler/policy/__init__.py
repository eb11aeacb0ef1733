"""Scheduling policies (pure Python): see base.Policy."""

from .base import BatchLimits, Job, Policy, PolicyConfig, Transition, form_batch
from .fcfs import FCFS

POLICIES: dict[str, type[Policy]] = {"fcfs": FCFS}


def make_policy(config: PolicyConfig, cost_model=None) -> Policy:
    """Build the policy named in `config`."""
    try:
        cls = POLICIES[config.name]
    except KeyError:
        raise ValueError(f"--policy {config.name!r} is unknown; choose one of {sorted(POLICIES)}") from None
    if cls is FCFS:
        return cls()
    return cls(config, cost_model)  # type: ignore[call-arg]


__all__ = [
    "BatchLimits",
    "Job",
    "Policy",
    "PolicyConfig",
    "Transition",
    "form_batch",
    "make_policy",
    "POLICIES",
    "FCFS",
]
