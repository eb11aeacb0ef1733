"""Admission control: a flash crowd is refused at the door (HTTP 429 / RESOURCE_EXHAUSTED), not queued.

Two bounds, checked before a request is tokenized:
- `--max-num-waiting`: jobs waiting for their first token. The gateway takes the larger of the
  scheduler's own count (`SchedulerInfo.num_waiting`, polled; it covers every gateway of the stack)
  and its own count of the requests it admitted that have no token yet (exact, and current between
  two polls: a burst that arrives within one poll is counted here).
- `--max-concurrent-requests` (TGI's name): requests this gateway streams at once.

vLLM queues without bound; see docs/design.md for why FastServe refuses instead.
"""

from __future__ import annotations

from dataclasses import dataclass


class Overloaded(Exception):
    """The server is full: the client should retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Ticket:
    """One admitted request: counted as waiting until its first token, as in flight until closed."""

    admission: Admission
    waiting: bool = True
    open: bool = True

    def started(self) -> None:
        """The first token arrived: no longer waiting."""
        if self.waiting:
            self.waiting = False
            self.admission.waiting -= 1

    def close(self) -> None:
        """The request ended (or was never streamed); idempotent."""
        self.started()
        if self.open:
            self.open = False
            self.admission.in_flight -= 1


class Admission:
    def __init__(self, max_num_waiting: int, max_concurrent_requests: int, retry_after: int = 1) -> None:
        self.max_num_waiting = max_num_waiting  # 0 = no bound
        self.max_concurrent_requests = max_concurrent_requests  # 0 = no bound
        self.retry_after = retry_after
        self.waiting = 0  # admitted here, no token yet
        self.in_flight = 0  # admitted here, not closed
        self.scheduler_waiting = 0  # the scheduler's num_waiting at its last poll

    def refusal(self) -> Overloaded | None:
        """What `admit` would raise now, admitting nothing: the HTTP front asks before it reads a
        body, so a flash crowd's excess costs no parsing (see http_limits.AdmissionDoor)."""
        if self.max_concurrent_requests and self.in_flight >= self.max_concurrent_requests:
            return Overloaded(
                f"server busy: {self.in_flight} requests in flight, the limit is "
                f"{self.max_concurrent_requests} (--max-concurrent-requests); retry after {self.retry_after} s",
                self.retry_after,
            )
        waiting = max(self.waiting, self.scheduler_waiting)
        if self.max_num_waiting and waiting >= self.max_num_waiting:
            return Overloaded(
                f"server busy: {waiting} requests waiting, the limit is {self.max_num_waiting} "
                f"(--max-num-waiting); retry after {self.retry_after} s",
                self.retry_after,
            )
        return None

    def admit(self) -> Ticket:
        """A ticket for one more request, or Overloaded naming the bound that is full."""
        refused = self.refusal()
        if refused is not None:
            raise refused
        self.waiting += 1
        self.in_flight += 1
        return Ticket(self)
