"""How many CPU threads a worker's step should use, given what other processes take of its CPUs.

The worker's OpenMP threads spin briefly after each parallel region (``GOMP_SPINCOUNT``, set in
``__main__``) rather than sleeping at once: a decode step makes hundreds of parallel regions,
and waking a sleeping thread for each cost 10-30 % of the step on the 2-core machine. Spinning
is only good while the team has its cores to itself. When another process keeps a core busy,
a team of two threads on two cores waits at every barrier for the thread that lost its core,
and a spinning thread takes the core from the process it waits on.

`ThreadGovernor` watches the CPUs this process may run on (``/proc/stat``) and its own CPU time,
every ``interval`` seconds at most: what the CPUs did minus what this process did is what the
others took. The step runs on as many threads as there are cores the others leave free
(rounded, at least one, at most ``max_threads``); a change needs two readings in a row that
agree, so one burst does not flip it. One thread never spins: no team, no barrier.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger("fastserve.worker.cpu_share")

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# a core counts as taken when the others use more than this much of it (and free below 1 - it)
TAKEN = 0.4


def busy_seconds(cpus: set[int], stat: str) -> float | None:
    """Seconds the given CPUs spent not idle since boot, from ``/proc/stat`` text (None if unreadable)."""
    total = 0
    found = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal ...
        fields = [int(x) for x in rest.split()]
        total += sum(fields[:3]) + sum(fields[5:8])
        found += 1
    return total / CLOCK_TICKS if found else None


def read_proc_stat() -> str:
    with open("/proc/stat") as f:
        return f.read()


class ThreadGovernor:
    def __init__(
        self,
        max_threads: int,
        cpus: set[int] | None = None,
        interval: float = 0.5,
        *,
        read_stat: Callable[[], str] = read_proc_stat,
        own_cpu: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self.max_threads = max(1, min(max_threads, len(self.cpus)))
        self.interval = interval
        self.read_stat, self.own_cpu, self.clock = read_stat, own_cpu, clock
        self.current = self.max_threads
        self._proposed = self.current
        self._last = self._reading()
        self.others = 0.0  # cores the other processes used over the last interval

    def _reading(self) -> tuple[float, float, float | None]:
        try:
            busy = busy_seconds(self.cpus, self.read_stat())
        except (OSError, ValueError):
            busy = None
        return self.clock(), self.own_cpu(), busy

    def threads(self) -> int:
        """The thread count for the next step (re-read at most every ``interval`` seconds)."""
        now = self.clock()
        if now - self._last[0] < self.interval:
            return self.current
        reading = self._reading()
        (t0, own0, busy0), (t1, own1, busy1) = self._last, reading
        self._last = reading
        if busy0 is None or busy1 is None or t1 <= t0:
            return self.current
        self.others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)
        free = len(self.cpus) - self.others
        target = max(1, min(self.max_threads, int(free + TAKEN)))
        if target != self.current and target == self._proposed:
            log.info(
                "%d -> %d threads: other processes use %.2f of this worker's %d CPUs",
                self.current,
                target,
                self.others,
                len(self.cpus),
            )
            self.current = target
        self._proposed = target
        return self.current

    def apply(self) -> int:
        """Sets torch's thread count for the steps of the calling thread (it is per thread) to
        `threads()`, when it differs; returns it."""
        import torch

        threads = self.threads()
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads
