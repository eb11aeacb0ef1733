"""ModelRunner: one rank's model shard, KV pool and sampler, driven one iteration at a time.

Every rank of the world receives the same list of `SeqWork` for an iteration. Stage 0
embeds; each stage runs its layers (TP all-reduces happen inside them) and sends the
flattened ``[tokens, hidden]`` activations to the next stage, whose receive buffer shape
follows from the same ``seqs``, so no metadata message is needed; the last stage gathers
the vocab-sharded logits of each job's last token on TP rank 0, which samples.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fastserve.model_spec import ModelSpec

from . import cpu_linear
from .attention import AttentionMetadata, PrefillChunk, triton_decode_available
from .cpu_kernels import paged_decode as build_cpu_decode
from .cuda_graphs import DecodeGraphs
from .kv_cache import KVCache
from .loader import init_dummy, load_checkpoint
from .model import OPTShard
from .penalties import TokenCounts, process_logits
from .sampling import GREEDY, Sampler, SamplingParams, TokenLogprobs, logprobs, top_logprobs
from .structured import Grammars
from .tp import ParallelContext

log = logging.getLogger("fastserve.worker.runner")
PROMPT_LOGPROBS_CHUNK = 256  # prompt positions scored at once (bounds the [chunk, vocab] logits)


def with_index(device: torch.device) -> torch.device:
    """Plain "cuda" as the current CUDA device with its index: torch.cuda.set_device refuses a
    device without one (a single-GPU worker is given "cuda")."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class SeqWork:
    request_id: str
    # tokens fed this iteration: the whole context on (re)prefill, else the last token; empty: the
    # token this rank kept from the job's last step (the scheduler sent this step before it had it)
    token_ids: list[int]
    start_pos: int  # tokens of this job already in the KV cache
    block_table: list[int]  # KV block ids covering positions [0, start_pos + len(token_ids))
    sampling: SamplingParams = GREEDY  # reproducible given (seed, sample_index)
    sample_index: int = 0  # how many tokens this job has generated so far
    # a chunk of the job's prefill that is not its last: its KV is written, nothing is sampled (its
    # token in the output is 0) and nothing is kept; the next chunk continues at start_pos + len(token_ids)
    partial: bool = False

    @property
    def first_prefill(self) -> bool:
        """The job's whole prompt is fed and nothing was generated yet."""
        return self.start_pos == 0 and self.sample_index == 0 and not self.partial


@dataclass
class StepOutput:
    tokens: list[int]  # one per job, in the order of the step's seqs
    logprobs: dict[int, TokenLogprobs]  # by seq index, for the jobs that asked
    prompt_logprobs: dict[int, list[TokenLogprobs]]  # by seq index: prompt tokens 1.., on the first prefill


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [T], decodes first
    positions: torch.Tensor  # int64 [T]
    meta: AttentionMetadata
    last_token: torch.Tensor  # int64 [B]: each job's last token within the T
    order: list[int]  # step-internal job i is seqs[order[i]]
    # the rows of last_token that are sampled (all but partial prefill chunks); None: every row
    sampled_rows: torch.Tensor | None = None


class ModelRunner:
    def __init__(
        self,
        spec: ModelSpec,
        *,
        dtype: torch.dtype,
        device: str,
        num_gpu_blocks: int | Callable[[], int],
        block_size: int = 16,
        parallel: ParallelContext | None = None,
        seed: int = 0,
        enforce_eager: bool = False,
        cuda_graph_sizes: Sequence[int] = (),
        cpu_attention: str = "cpp",
    ) -> None:
        self.spec = spec
        self.dtype = dtype
        self.device = with_index(torch.device(device))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL binds its communicators to the current device
        self.parallel = parallel or ParallelContext()
        self.block_size = block_size
        self.model = OPTShard(spec, self.parallel, dtype=dtype, device=self.device)
        if spec.checkpoint:
            load_checkpoint(self.model, spec.checkpoint)
        else:
            init_dummy(self.model, seed)
        # enforce_eager: the reference path (plain F.linear, no compiled parts, no CUDA graphs)
        self.enforce_eager = enforce_eager
        self.cpu_decode = None  # the C++ decode attention (see cpu_kernels), built at start-up
        if not enforce_eager and self.device.type == "cpu":
            started = time.perf_counter()
            packed = self.model.prepack()
            log.info("packed %d linears for oneDNN in %.2fs", packed, time.perf_counter() - started)
            if packed:
                timings = cpu_linear.choose_few_rows(self.model.packed_weights())
                log.info(
                    "linears of 1-%d rows: %s (a pass over the weights, ms: %s)",
                    cpu_linear.CHOSEN_ROWS - 1,
                    ", ".join(f"{rows}: {cpu_linear.few_rows.get(rows, 'packed')}" for rows in timings),
                    "; ".join(
                        f"{rows} row(s) " + ", ".join(f"{way} {ms:.1f}" for way, ms in by_way.items())
                        for rows, by_way in timings.items()
                    ),
                )
            if dtype == torch.float32 and cpu_attention == "cpp":
                started = time.perf_counter()
                self.cpu_decode = build_cpu_decode()
                log.info(
                    "C++ decode attention: %s (%.1fs)", bool(self.cpu_decode), time.perf_counter() - started
                )
        # a function sizes the pool from the memory the weights left free
        self.num_blocks = num_gpu_blocks() if callable(num_gpu_blocks) else num_gpu_blocks
        graphs = self._graphs_wanted(cuda_graph_sizes, enforce_eager)
        self.kv = KVCache(
            self.model.num_local_layers,
            self.num_blocks,
            block_size,
            spec.num_heads // self.parallel.tp_size,
            spec.head_dim,
            dtype,
            self.device,
            scratch_blocks=1 if graphs else 0,
        )
        # decode-only steps replayed from CUDA graphs (on CPU: the same padded step, no graph)
        self.graphs = (
            DecodeGraphs(self.model, self.kv, cuda_graph_sizes, capture=self.device.type == "cuda")
            if graphs
            else None
        )
        self.sampler = Sampler(seed, self.device) if self.is_driver else None
        self.token_counts = TokenCounts(spec.vocab_size, self.device) if self.is_driver else None
        self.grammars = (
            Grammars(spec.tokenizer, spec.vocab_size, spec.eos_token_id) if self.is_driver else None
        )
        # each running job's last sampled token, on every rank that embeds (without pipeline
        # parallelism: the whole TP group, which gets it from the driver by broadcast)
        self.keeps_tokens = self.parallel.pp_size == 1
        self.last_tokens: dict[str, int] = {}

    def _graphs_wanted(self, sizes: Sequence[int], enforce_eager: bool) -> bool:
        if not sizes or enforce_eager:
            return False
        if self.parallel.tp_size > 1 or self.parallel.pp_size > 1:
            log.info(
                "no CUDA graphs: tp=%d pp=%d (one rank only)", self.parallel.tp_size, self.parallel.pp_size
            )
            return False
        if self.device.type == "cuda" and not triton_decode_available():
            log.warning("no CUDA graphs: decode attention needs the Triton kernel inside a graph")
            return False
        return True

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

    def step(self, seqs: list[SeqWork]) -> list[int] | None:
        """Runs one iteration; the sampled token per job (same order as ``seqs``) on the driver, else None."""
        out = self.run(seqs)
        return out.tokens if out is not None else None

    def forget(self, request_ids: list[str]) -> None:
        """Drops what this rank keeps for jobs that left."""
        if self.token_counts is not None:
            self.token_counts.forget(request_ids)
        if self.grammars is not None:
            self.grammars.forget(request_ids)
        for rid in request_ids:
            self.last_tokens.pop(rid, None)

    def forget_all(self) -> None:
        """Drops what this rank keeps for every job (a new step stream sends every job in full again);
        with PP the driver keeps no last tokens, so they cannot name the jobs to forget."""
        if self.token_counts is not None:
            self.token_counts.forget(list(self.token_counts.slots))
        if self.grammars is not None:
            self.grammars.forget(list(self.grammars.matchers))
        self.last_tokens.clear()

    @torch.inference_mode()
    def run(self, seqs: list[SeqWork]) -> StepOutput | None:
        """Runs one iteration; on the driver the sampled tokens and the logprobs asked for, else None."""
        if not seqs:
            return StepOutput([], {}, {}) if self.is_driver else None
        for s in seqs:
            if not s.token_ids:
                if s.request_id not in self.last_tokens:
                    raise ValueError(f"{s.request_id}: no tokens to feed and none kept from its last step")
                s.token_ids = [self.last_tokens[s.request_id]]
        inputs = self.prepare(seqs)
        par, model = self.parallel, self.model
        if (
            self.graphs is not None
            and inputs.sampled_rows is None
            and self.graphs.fits(inputs.meta, len(inputs.input_ids))
        ):
            return self._finish(
                seqs, inputs, self.graphs.run(inputs.input_ids, inputs.positions, inputs.meta), None
            )
        if par.is_first_stage:
            hidden = model.embed(inputs.input_ids, inputs.positions)
        else:
            hidden = par.recv_prev((len(inputs.positions), self.spec.hidden_size), self.dtype, self.device)
        hidden = model(hidden, inputs.meta, self.kv)
        if not par.is_last_stage:
            par.send_next(hidden)
            return None
        last = inputs.last_token
        if inputs.sampled_rows is not None:
            last = last.index_select(0, inputs.sampled_rows)
        logits = par.gather_last_dim(model.logits(hidden.index_select(0, last)))
        return self._finish(seqs, inputs, logits, self._prompt_logprobs(seqs, inputs, hidden))

    def _finish(
        self,
        seqs: list[SeqWork],
        inputs: StepInputs,
        logits: torch.Tensor | None,
        prompt_logprobs: dict[int, list[TokenLogprobs]] | None,
    ) -> StepOutput | None:
        """The last stage's part after the logits: sampling on the driver, the kept tokens everywhere."""
        par = self.parallel
        if not self.is_driver:
            if self.keeps_tokens and par.tp_size > 1:
                self._keep(seqs, self._shared_tokens(len(seqs)))
            return None
        order = [i for i in inputs.order if not seqs[i].partial]  # the rows of `logits`
        ordered = [seqs[i] for i in order]
        sampled, sampled_logprobs = (
            self._sample(logits[:, : self.spec.vocab_size].float(), ordered) if ordered else ([], {})
        )
        tokens = [0] * len(seqs)
        for i, token in zip(order, sampled, strict=True):
            tokens[i] = token
        if self.keeps_tokens:
            self._keep(seqs, self._shared_tokens(len(seqs), tokens) if par.tp_size > 1 else tokens)
        return StepOutput(tokens, {order[k]: lp for k, lp in sampled_logprobs.items()}, prompt_logprobs or {})

    def _sample(
        self, logits: torch.Tensor, seqs: list[SeqWork]
    ) -> tuple[list[int], dict[int, TokenLogprobs]]:
        """Penalises, samples and scores one row of ``logits`` per job of ``seqs`` (the driver's part)."""
        counts = self.token_counts
        params = [s.sampling for s in seqs]
        indices = [s.sample_index for s in seqs]
        ids = [s.request_id for s in seqs]
        penalised = [s for s in seqs if s.sampling.penalised]
        for s in penalised:
            if s.start_pos == 0:  # the whole context: rebuild the counts (first prefill or recompute)
                split = len(s.token_ids) - s.sample_index
                counts.start(s.request_id, s.token_ids[:split], s.token_ids[split:])
            elif s.request_id not in counts:
                raise ValueError(f"{s.request_id}: penalised, but this rank never saw its prefill")
        process_logits(logits, params, indices, ids, counts)
        constrained = [k for k, p in enumerate(params) if p.structured is not None]
        if constrained:
            self.grammars.mask(logits, seqs, constrained)
        tokens = self.sampler(logits, params, indices)
        if constrained:
            self.grammars.accept(seqs, constrained, tokens)
        if penalised:
            counts.add(
                [s.request_id for s in penalised],
                [t for s, t in zip(seqs, tokens, strict=True) if s.sampling.penalised],
            )
        return tokens, logprobs(logits, params, tokens)

    def _prompt_logprobs(
        self, seqs: list[SeqWork], inputs: StepInputs, hidden: torch.Tensor
    ) -> dict[int, list[TokenLogprobs]] | None:
        """Every prompt token's logprob (from the position before it) for the first prefills that ask.
        All ranks of the last stage take part (the logits are vocab-sharded); the driver returns them."""
        wanted = [
            (k, i)
            for k, i in enumerate(inputs.order)
            if seqs[i].sampling.prompt_logprobs >= 0 and seqs[i].first_prefill and len(seqs[i].token_ids) > 1
        ]
        if not wanted:
            return None
        last = inputs.last_token.tolist()
        out: dict[int, list[TokenLogprobs]] = {}
        for k, i in wanted:
            s = seqs[i]
            n = len(s.token_ids)
            rows = torch.arange(last[k] - n + 1, last[k], device=self.device)  # positions 0 .. n-2
            targets = torch.tensor(s.token_ids[1:], dtype=torch.int64, device=self.device)
            scored: list[TokenLogprobs] = []
            for lo in range(0, n - 1, PROMPT_LOGPROBS_CHUNK):
                chunk = rows[lo : lo + PROMPT_LOGPROBS_CHUNK]
                logits = self.parallel.gather_last_dim(self.model.logits(hidden.index_select(0, chunk)))
                if logits is not None:
                    lp = logits[:, : self.spec.vocab_size].float().log_softmax(dim=-1)
                    scored += top_logprobs(lp, targets[lo : lo + len(chunk)], s.sampling.prompt_logprobs)
            out[i] = scored
        return out

    def _shared_tokens(self, n: int, tokens: list[int] | None = None) -> list[int]:
        """The driver's sampled tokens on every rank of its TP group."""
        t = torch.tensor(tokens or [0] * n, dtype=torch.int64, device=self.device)
        return self.parallel.broadcast_from_tp0(t).tolist()

    def _keep(self, seqs: list[SeqWork], tokens: list[int]) -> None:
        for s, token in zip(seqs, tokens, strict=True):
            if not s.partial:
                self.last_tokens[s.request_id] = token

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
            workspace=self.kv.workspace,
            cpu_decode=self.cpu_decode,
        )
        sampled = [k for k, i in enumerate(order) if not seqs[i].partial]
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            meta=meta,
            last_token=torch.tensor(last, dtype=torch.int64, device=device),
            order=order,
            sampled_rows=(
                torch.tensor(sampled, dtype=torch.int64, device=device) if len(sampled) < len(order) else None
            ),
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
