"""Tensor and pipeline parallelism: who this rank is, and the collectives the model uses.

Rank layout: ``rank = pp_stage * tp_size + tp_rank``. The ranks of one pipeline stage
form a TP group (all-reduce inside the layers, gather of vocab-sharded logits); a rank
sends its stage's output activations to the rank with the same ``tp_rank`` in the next
stage (every TP rank holds the full hidden state after the all-reduce, so each pair of
peers exchanges the same tensor and no scatter/gather across the group is needed).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger("fastserve.worker.tp")


def split_range(size: int, parts: int, index: int) -> tuple[int, int]:
    """[start, end) of part ``index`` when ``size`` items are split into ``parts`` near-equal runs.

    The first ``size % parts`` parts get one item more, so pipeline stages differ by at most a layer.
    """
    base, extra = divmod(size, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    tp_size: int = 1
    pp_size: int = 1
    tp_group: dist.ProcessGroup | None = None
    # isend handles (with the tensors they read) still in flight; see send_next.
    _pending: list[tuple[dist.Work, torch.Tensor]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.tp_size * self.pp_size != self.world_size:
            raise ValueError(f"world_size {self.world_size} != tp {self.tp_size} x pp {self.pp_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} not in [0, {self.world_size})")

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_stage(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """The rank that samples and answers: TP rank 0 of the last stage."""
        return self.is_last_stage and self.tp_rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the TP group, in place (row-parallel layers' partial outputs)."""
        if self.tp_size > 1:
            dist.all_reduce(x, group=self.tp_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Concatenates the TP group's ``x`` along the last dim on TP rank 0; None on the others."""
        if self.tp_size == 1:
            return x
        x = x.contiguous()
        dst = self.pp_stage * self.tp_size
        parts = [torch.empty_like(x) for _ in range(self.tp_size)] if self.tp_rank == 0 else None
        dist.gather(x, parts, dst=dst, group=self.tp_group)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_from_tp0(self, x: torch.Tensor) -> torch.Tensor:
        """TP rank 0's ``x`` on every rank of the TP group, in place."""
        if self.tp_size > 1:
            dist.broadcast(x, src=self.pp_stage * self.tp_size, group=self.tp_group)
        return x

    def send_next(self, x: torch.Tensor) -> None:
        """Sends activations to the next stage without waiting, so this stage can start its next step.

        The tensor is kept alive until its send completes; sends from earlier steps are
        reaped here (they complete in order, since the receiver reads steps in order).
        """
        self._pending = [(w, t) for w, t in self._pending if not w.is_completed()]
        x = x.contiguous()
        work = dist.isend(x, dst=self.rank + self.tp_size)
        self._pending.append((work, x))

    def recv_prev(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(buf, src=self.rank - self.tp_size)
        return buf

    def wait_sends(self) -> None:
        for work, _ in self._pending:
            work.wait()
        self._pending.clear()


def is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(address)).is_loopback
    except (OSError, ValueError):
        return False


def loopback_store(rank: int, world_size: int, address: str, port: int, timeout: timedelta) -> dist.TCPStore:
    """The rendezvous of a one-machine world, reachable from this machine only.

    torch's TCPStore listens on every interface, and it has no authentication; rank 0 binds the
    socket to loopback itself and hands it over. gloo's and NCCL's own connections go over the
    loopback interface too (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME, unless set already)."""
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(name, "lo")
    if rank != 0:
        return dist.TCPStore(address, port, world_size, False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    sock.listen(128)
    return dist.TCPStore(address, port, world_size, True, timeout=timeout, master_listen_fd=sock.detach())


def init_distributed(
    rank: int,
    world_size: int,
    tp_size: int,
    pp_size: int,
    master_addr: str,
    master_port: int,
    backend: str | None = None,
    timeout_s: float = 1800.0,
) -> ParallelContext:
    """Joins the torch.distributed world (NCCL on CUDA, gloo on CPU) and builds the TP groups.

    Every rank creates every TP group, in the same order, as ``new_group`` requires.
    """
    if tp_size * pp_size != world_size:
        raise ValueError(f"world_size {world_size} != tp {tp_size} x pp {pp_size}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        if is_loopback(master_addr):
            dist.init_process_group(
                backend,
                store=loopback_store(rank, world_size, master_addr, master_port, timeout),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        else:  # multi-node: rank 0 listens where the other nodes reach it (a port to firewall)
            dist.init_process_group(
                backend,
                init_method=f"tcp://{master_addr}:{master_port}",
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
    tp_group = None
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        group = dist.new_group(ranks) if tp_size > 1 else None
        if rank in ranks:
            tp_group = group
    log.info("rank %d/%d joined (%s): tp=%d pp=%d", rank, world_size, backend, tp_size, pp_size)
    return ParallelContext(
        rank=rank, world_size=world_size, tp_size=tp_size, pp_size=pp_size, tp_group=tp_group
    )
