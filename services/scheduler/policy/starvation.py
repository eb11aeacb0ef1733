"""The starvation guard's check, shared by MLFQ and the sorted policies that guard against starvation:
a job that has not run for α seconds (since its last iteration, or its arrival) is starved."""

from __future__ import annotations

from collections.abc import Iterable

from .base import Job, PolicyConfig


def starvation_threshold(config: PolicyConfig) -> float:
    """α (--starvation-threshold), refused unless > 0."""
    if config.starvation_threshold <= 0:
        raise ValueError(f"--starvation-threshold must be > 0, got {config.starvation_threshold}")
    return config.starvation_threshold


def starved(idle: Iterable[Job], now: float, threshold: float) -> list[Job]:
    """The jobs of `idle` (ordered by when each last ran, or arrived) that have not run for
    `threshold` seconds, longest-waiting first: a prefix of `idle`."""
    deadline = now - threshold
    out = []
    for job in idle:
        since = job.last_run_time if job.last_run_time is not None else job.arrival_time
        if since > deadline:
            break
        out.append(job)
    return out
