"""Ends this rank when a peer of its torch.distributed world is gone, so the group re-forms.

A world cannot take one rank back: a replacement rank would rendezvous into the old world's
store and hang. Under `fastserve up` the supervisor restarts the whole TP x PP group itself;
in containers (compose, Kubernetes) each rank is restarted alone by its restart policy. So each
rank beats on the world's store (its incarnation and a counter, every second) and watches the
others: when the store (hosted by rank 0) stops answering, a peer's counter stalls for
--peer-timeout seconds, or a peer's incarnation changes (it was restarted into this stale world),
the rank exits with status 75 and its restart policy brings it back into a fresh world. A
restarted rank that finds its own beat still in the store waits for that stale world to end
(wait_for_fresh_world) instead of joining it, where it would hang.
The watch runs on its own thread and store connection; the model's collectives never wait on it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from datetime import timedelta

import torch.distributed as dist

log = logging.getLogger("fastserve.worker.peer_watch")
EXIT_STATUS = 75  # EX_TEMPFAIL: restart me
BEAT_S = 1.0


def key(rank: int) -> str:
    return f"fastserve/alive/{rank}"


def watch_peers(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> None:
    """Starts the watch (a daemon thread) for this rank; timeout_s <= 0 or a world of one: no watch."""
    if timeout_s <= 0 or world_size <= 1:
        return
    # the world's own TCPStore (rank 0 hosts it), through a client connection of this thread's own
    store = dist.TCPStore(
        master_addr, master_port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s)
    )
    threading.Thread(
        target=_run, args=(store, rank, world_size, timeout_s), name="peer-watch", daemon=True
    ).start()


def wait_for_fresh_world(
    rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float
) -> None:
    """Before joining: while rank 0's store already holds this rank's beat, it serves a world that
    had this rank before (rank 0 has not noticed the restart yet): wait until it is gone."""
    if timeout_s <= 0 or world_size <= 1 or rank == 0:
        return
    try:
        store = dist.TCPStore(
            master_addr, master_port, world_size, is_master=False, timeout=timedelta(seconds=5)
        )
    except Exception:  # no store yet (rank 0 is starting): the world that forms is fresh
        return
    while True:
        try:
            if not store.check([key(rank)]):
                return
        except Exception:  # the stale world's store is gone
            return
        log.warning(
            "rank %d: the store at %s:%d serves a stale world; waiting for it to end",
            rank,
            master_addr,
            master_port,
        )
        time.sleep(BEAT_S)


class Silence:
    """The watch's judgement, pass by pass: whether a peer stalled or was restarted.

    A peer's silence clock starts when this rank first observes it, so a peer that died before
    its first beat (its key missing: b"") is declared silent after the timeout too.
    """

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._seen: dict[int, tuple[bytes, float]] = {}  # peer -> (its last beat, when it changed)
        self._first: dict[int, bytes] = {}  # peer -> the incarnation it had when first seen

    def why_leave(self, beats: dict[int, bytes], now: float) -> str | None:
        """The reason to leave the world given the peers' current beats (b"": none yet), or None."""
        for peer, value in beats.items():
            last, since = self._seen.setdefault(peer, (value, now))
            if value != last:
                self._seen[peer] = (value, now)
            elif now - since > self.timeout_s:
                return (
                    f"rank {peer} has not beaten for {now - since:.1f}s (--peer-timeout {self.timeout_s:g})"
                )
            born = value.partition(b":")[0]
            if born and self._first.setdefault(peer, born) != born:
                return f"rank {peer} was restarted: the world must re-form"
        return None


def _run(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> None:
    incarnation = uuid.uuid4().hex
    peers = [peer for peer in range(world_size) if peer != rank]
    silence = Silence(timeout_s)
    beat = 0
    while True:
        now = time.monotonic()
        beat += 1
        try:
            store.set(key(rank), f"{incarnation}:{beat}")
            beats = {peer: store.get(key(peer)) if store.check([key(peer)]) else b"" for peer in peers}
        except Exception as exc:  # the store's host (rank 0) is gone: so is the world
            _leave(rank, f"the world's store at rank 0 stopped answering ({type(exc).__name__}: {exc})")
        why = silence.why_leave(beats, now)
        if why is not None:
            _leave(rank, why)
        time.sleep(BEAT_S)


def _leave(rank: int, why: str) -> None:
    log.error(
        "rank %d leaves its torch.distributed world: %s; exiting %d to be restarted", rank, why, EXIT_STATUS
    )
    logging.shutdown()
    os._exit(EXIT_STATUS)
