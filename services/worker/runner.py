"""ModelRunner: one rank's model shard, KV pool and sampler, driven one iteration at a time.

Every rank of the world receives the same list of `SeqWork` for an iteration. Stage 0
embeds; each stage runs its layers (TP all-reduces happen inside them) and sends the
flattened ``[tokens, hidden]`` activations to the next stage, whose receive buffer shape
follows from the same ``seqs``, so no metadata message is needed; the last stage gathers
the vocab-sharded logits of each job's last token on TP rank 0, which samples.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fastserve.model_spec import ModelSpec

from .attention import AttentionMetadata, PrefillChunk
from .kv_cache import KVCache
from .loader import init_dummy, load_checkpoint
from .model import OPTShard
from .sampling import Sampler
from .tp import ParallelContext

log = logging.getLogger("fastserve.worker.runner")


@dataclass
class SeqWork:
    request_id: str
    token_ids: list[int]  # tokens fed this iteration: the whole context on (re)prefill, else the last token
    start_pos: int  # tokens of this job already in the KV cache
    block_table: list[int]  # KV block ids covering positions [0, start_pos + len(token_ids))
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None  # per-request seed; sampling is reproducible given (seed, sample_index)
    sample_index: int = 0  # how many tokens this job has generated so far


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T], decodes first
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    last_token: torch.Tensor  # int64 [B]: each job's last token within the T
    order: list[int]  # step-internal job i is seqs[order[i]]


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        *,
        dtype: torch.dtype,
        device: str,
        num_gpu_blocks: int,
        block_size: int = 16,
        parallel: ParallelContext | None = None,
        seed: int = 0,
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL binds its communicators to the current device
        self.parallel = parallel or ParallelContext()
        self.block_size = block_size
        self.num_blocks = num_gpu_blocks
        self.model = OPTShard(spec, self.parallel, dtype=dtype, device=self.device)
        if spec.checkpoint:
            load_checkpoint(self.model, spec.checkpoint)
        else:
            init_dummy(self.model, seed)
        self.kv = KVCache(
            self.model.num_local_layers,
            num_gpu_blocks,
            block_size,
            spec.num_heads // self.parallel.tp_size,
            spec.head_dim,
            dtype,
            self.device,
        )
        self.sampler = Sampler(seed, self.device) if self.is_driver else None

    @property
    def is_driver(self) -> bool:
        """This rank returns the sampled tokens (TP rank 0 of the last pipeline stage)."""
        return self.parallel.is_driver

    @staticmethod
    def kv_bytes_per_block(
        spec: ModelSpec, dtype: torch.dtype, block_size: int, tp_size: int = 1, pp_size: int = 1
    ) -> int:
        """Bytes one KV block costs a rank: its heads, in every layer of its (largest) stage."""
        layers = -(-spec.num_layers // pp_size)
        return KVCache.bytes_per_block(layers, block_size, spec.num_heads // tp_size, spec.head_dim, dtype)

    @torch.inference_mode()
    def step(self, seqs: list[SeqWork]) -> list[int] | None:
        """Runs one iteration; the sampled token per job (same order as ``seqs``) on the driver, else None."""
        if not seqs:
            return [] if self.is_driver else None
        inputs = self.prepare(seqs)
        par, model = self.parallel, self.model
        if par.is_first_stage:
            hidden = model.embed(inputs.input_ids, inputs.positions)
        else:
            hidden = par.recv_prev((len(inputs.positions), self.spec.hidden_size), self.dtype, self.device)
        hidden = model(hidden, inputs.meta, self.kv)
        if not par.is_last_stage:
            par.send_next(hidden)
            return None
        logits = par.gather_last_dim(model.logits(hidden.index_select(0, inputs.last_token)))
        if not self.is_driver:
            return None
        logits = logits[:, : self.spec.vocab_size]
        ordered = [seqs[i] for i in inputs.order]
        sampled = self.sampler(
            logits,
            [s.temperature for s in ordered],
            [s.top_p for s in ordered],
            [s.top_k for s in ordered],
            [s.seed for s in ordered],
            [s.sample_index for s in ordered],
        )
        tokens = [0] * len(seqs)
        for i, token in zip(inputs.order, sampled, strict=True):
            tokens[i] = token
        return tokens

    def prepare(self, seqs: list[SeqWork]) -> StepInputs:
        """Flattens the jobs (decodes first) into token, position and cache-slot tensors."""
        for s in seqs:
            self._validate(s)
        bs = self.block_size
        order = [i for i, s in enumerate(seqs) if len(s.token_ids) == 1]
        num_decodes = len(order)
        order += [i for i, s in enumerate(seqs) if len(s.token_ids) > 1]
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last: list[int] = []
        tables: list[list[int]] = []
        context_lens: list[int] = []
        for i in order[:num_decodes]:
            s = seqs[i]
            pos = s.start_pos
            ids.append(s.token_ids[0])
            positions.append(pos)
            slots.append(s.block_table[pos // bs] * bs + pos % bs)
            last.append(len(ids) - 1)
            tables.append(s.block_table[: pos // bs + 1])
            context_lens.append(pos + 1)
        prefills: list[PrefillChunk] = []
        device = self.device
        for i in order[num_decodes:]:
            s = seqs[i]
            n, start = len(s.token_ids), s.start_pos
            table = s.block_table
            chunk = PrefillChunk(len(ids), len(ids) + n, start)
            end = start + n
            seq_slots = [table[p // bs] * bs + p % bs for p in range(end)]
            if start > 0:  # attends to its cached prefix: keep every context slot, mask causally
                chunk.context_slots = torch.tensor(seq_slots, dtype=torch.int64, device=device)
                query_pos = torch.arange(start, end, device=device)
                chunk.mask = torch.arange(end, device=device)[None, :] <= query_pos[:, None]
                seq_slots = seq_slots[start:]
            ids.extend(s.token_ids)
            positions.extend(range(start, end))
            slots.extend(seq_slots)
            last.append(len(ids) - 1)
            prefills.append(chunk)
        block_tables = lens = None
        if num_decodes:
            width = max(len(t) for t in tables)
            block_tables = torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device
            )
            lens = torch.tensor(context_lens, dtype=torch.int32, device=device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            num_decodes=num_decodes,
            decode_block_tables=block_tables,
            decode_context_lens=lens,
            prefills=prefills,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            meta=meta,
            last_token=torch.tensor(last, dtype=torch.int64, device=device),
            order=order,
        )

    def _validate(self, s: SeqWork) -> None:
        """Clear errors for bad work, instead of an index error deep in a kernel (or a device assert)."""
        n, end = len(s.token_ids), s.start_pos + len(s.token_ids)
        if n == 0:
            raise ValueError(f"{s.request_id}: no tokens to feed")
        if s.start_pos < 0 or end > self.spec.max_positions:
            raise ValueError(
                f"{s.request_id}: positions [{s.start_pos}, {end}) exceed max_positions {self.spec.max_positions}"
            )
        needed = -(-end // self.block_size)
        if len(s.block_table) < needed:
            raise ValueError(
                f"{s.request_id}: {len(s.block_table)} blocks cannot hold {end} tokens (block size {self.block_size})"
            )
        table = s.block_table[:needed]
        if min(table) < 0 or max(table) >= self.num_blocks:
            raise ValueError(f"{s.request_id}: block ids outside [0, {self.num_blocks})")
        if min(s.token_ids) < 0 or max(s.token_ids) >= self.spec.vocab_size:
            raise ValueError(f"{s.request_id}: token ids outside [0, {self.spec.vocab_size})")
