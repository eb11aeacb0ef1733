"""Decode steps replayed from CUDA graphs, one graph per batch-size bucket.

A decode step of a small model on a GPU is a few hundred short kernels, and launching them
from Python costs more than running them. Captured once into a CUDA graph, a step is one
launch. A graph replays fixed shapes and fixed addresses, so:

* inputs live in static buffers sized for the largest bucket: token ids, positions, cache
  slots, block tables padded to the model's longest context, context lengths;
* a batch of ``n`` decodes runs the graph of the smallest bucket ``>= n``; the padded rows
  feed token 0 at position 0, write their K/V into a scratch block past the pool (which the
  KV manager never hands out) and attend only to it, and their logits are dropped;
* only decode-only steps on one rank (tp = pp = 1) replay; prefills, mixed steps and batches
  above the largest bucket run eagerly, as everything does with ``--enforce-eager``.

Decode attention inside a graph must not synchronise with the host: on CUDA it is the
Triton kernel, which reads the context lengths on the device. Without Triton no graph is
captured.

``capture=False`` runs the same padded, static-buffer step without a graph: the fallback,
and how the bucketing and padding are tested on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from .attention import AttentionMetadata
from .kv_cache import KVCache
from .model import OPTShard

log = logging.getLogger("fastserve.worker.cuda_graphs")


def parse_sizes(text: str) -> list[int]:
    """``--cuda-graph-sizes``: comma-separated batch sizes >= 1; empty = no graphs."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not all(part.isascii() and part.isdigit() and int(part) >= 1 for part in parts):
        raise argparse.ArgumentTypeError(
            f"--cuda-graph-sizes must be comma-separated batch sizes >= 1, got {text!r}"
        )
    return sorted({int(part) for part in parts})


class DecodeGraphs:
    """Captured (or, with ``capture=False``, padded eager) decode steps for the bucket sizes."""

    def __init__(self, model: OPTShard, kv: KVCache, sizes: Sequence[int], *, capture: bool) -> None:
        if kv.scratch_block is None:
            raise ValueError("DecodeGraphs needs a KV pool with a scratch block (KVCache(scratch_blocks=1))")
        if not sizes:
            raise ValueError("DecodeGraphs needs at least one batch size")
        self.model = model
        self.kv = kv
        self.sizes = sorted(sizes)
        self.capture = capture
        device = kv.k_cache[0].device
        largest = self.sizes[-1]
        width = -(-model.spec.max_positions // kv.block_size)
        scratch_slot = kv.scratch_block * kv.block_size
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = torch.full((largest, width), kv.scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.outputs: dict[int, Tensor] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture_all()

    def bucket(self, batch: int) -> int | None:
        """The smallest size that holds ``batch`` decodes, or None above the largest."""
        return next((size for size in self.sizes if size >= batch), None)

    def fits(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step can replay: decodes only, no more than the largest bucket."""
        return not meta.prefills and meta.num_decodes == num_tokens and self.bucket(num_tokens) is not None

    def _forward(self, batch: int) -> Tensor:
        """The step on the first ``batch`` rows of the static buffers: ``[batch, vocab]`` logits."""
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            num_decodes=batch,
            decode_block_tables=self.block_tables[:batch],
            decode_context_lens=self.context_lens[:batch],
            prefills=[],
            workspace=self.kv.workspace,
        )
        hidden = self.model.embed(self.input_ids[:batch], self.positions[:batch])
        return self.model.logits(self.model(hidden, meta, self.kv))

    def _capture_all(self) -> None:
        started = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory pool
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up: allocator and Triton autotuning outside the capture
                for _ in range(2):
                    self._forward(size)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info(
            "captured %d decode CUDA graphs (batch %s) in %.1fs",
            len(self.graphs),
            self.sizes,
            time.perf_counter() - started,
        )

    def run(self, input_ids: Tensor, positions: Tensor, meta: AttentionMetadata) -> Tensor:
        """``[n, vocab]`` logits of a decode-only step (``fits`` said yes) of ``n`` sequences."""
        n = meta.num_decodes
        size = self.bucket(n)
        tables = meta.decode_block_tables
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.context_lens[:n].copy_(meta.decode_context_lens)
        self.block_tables[:n, : tables.shape[1]].copy_(tables)
        self._reset_padding(n, size)
        if self.capture:
            self.graphs[size].replay()
            logits = self.outputs[size]
        else:
            logits = self._forward(size)
        return logits[:n]

    def _reset_padding(self, n: int, size: int) -> None:
        """Rows ``[n, size)`` back to the scratch block (an earlier, larger step left real ones)."""
        if n == size:
            return
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(self.kv.scratch_block * self.kv.block_size)
        self.block_tables[n:size].fill_(self.kv.scratch_block)
        self.context_lens[n:size].fill_(1)
