"""OPT in plain PyTorch: one rank's shard (its pipeline stage's layers, its TP rank's slice).

Megatron-style tensor parallelism (with ``t`` = TP size):

* QKV is one fused column-parallel linear: this rank's ``num_heads / t`` heads of q, k
  and v, stacked ``[q; k; v]``. Attention runs on local heads only, against the local
  slice of the KV pool.
* ``out_proj`` and ``fc2`` are row-parallel: each rank multiplies its slice of the input
  features, the partial outputs are all-reduced, and the (replicated) bias is added once.
* ``fc1`` is column-parallel (``ffn_dim / t`` features per rank), so no communication
  between fc1 and fc2.
* The token embedding and the LM head (tied to it) are split by vocabulary rows. The
  alternative, replicating them, would cost every TP rank ``vocab * dim`` parameters:
  1.2 GB in fp16 for OPT-175B (memory a TP=8 rank would rather give the KV pool), and
  ~30% of OPT-125m's weights. Splitting costs one all-reduce of the
  ``[tokens, dim]`` embeddings on stage 0 and a gather of ``[batch, vocab / t]`` logits
  to TP rank 0 on the last stage, both small next to the per-layer all-reduces.
  Position embeddings, layer norms and ``project_in``/``project_out`` are replicated:
  they are small (``(max_positions + 2) * hidden`` is under 1.5% of every real-size preset).

Pipeline parallelism: stage 0 owns the embeddings, the last stage the final norm,
``project_out`` and the LM head; the layers in between are split near-evenly.

Parameters are allocated with ``torch.empty`` on the target device and dtype; the loader
fills them (from a checkpoint, or dummy values), so nothing is initialised twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastserve.model_spec import ModelSpec

from . import cpu_linear
from .attention import AttentionMetadata, paged_attention
from .kv_cache import KVCache
from .tp import ParallelContext, split_range

LAYER_NORM_EPS = 1e-5  # OPT's (nn.LayerNorm's default)


def _param(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, *, bias: bool, dtype, device) -> None:
        super().__init__()
        self.weight = _param(out_features, in_features, dtype=dtype, device=device)
        self.bias = _param(out_features, dtype=dtype, device=device) if bias else None
        self.packed: Tensor | None = None  # the oneDNN copy of weight (see cpu_linear), once prepacked

    def prepack(self) -> bool:
        """Packs the (loaded) weight for oneDNN where it can serve it; True if it did."""
        self.packed = cpu_linear.pack(self.weight)
        return self.packed is not None

    def matmul(self, x: Tensor, bias: Tensor | None) -> Tensor:
        if self.packed is not None:
            return cpu_linear.linear(x, self.weight, self.packed, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.matmul(x, self.bias)

    def forward_relu(self, x: Tensor) -> Tensor:
        """``relu(self(x))``, fused into the matmul when packed."""
        if self.packed is not None:
            return cpu_linear.linear(x, self.weight, self.packed, self.bias, "relu")
        return F.relu(F.linear(x, self.weight, self.bias))


class RowParallelLinear(Linear):
    """Input features split across the TP group; partial outputs summed, then the full bias added."""

    def __init__(self, in_features: int, out_features: int, parallel: ParallelContext, *, dtype, device):
        super().__init__(in_features // parallel.tp_size, out_features, bias=True, dtype=dtype, device=device)
        self.parallel = parallel

    def forward(self, x: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            return self.matmul(x, self.bias)
        return self.parallel.all_reduce(self.matmul(x, None)).add_(self.bias)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, *, dtype, device) -> None:
        super().__init__()
        self.weight = _param(dim, dtype=dtype, device=device)
        self.bias = _param(dim, dtype=dtype, device=device)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, LAYER_NORM_EPS)


class VocabParallelEmbedding(nn.Module):
    """Rows ``[vocab_start, vocab_start + rows)`` of the (padded) vocabulary; also the tied LM head."""

    def __init__(self, vocab_size: int, dim: int, parallel: ParallelContext, *, dtype, device) -> None:
        super().__init__()
        self.parallel = parallel
        self.rows = -(-vocab_size // parallel.tp_size)  # padded so every rank holds the same count
        self.vocab_start = parallel.tp_rank * self.rows
        self.weight = _param(self.rows, dim, dtype=dtype, device=device)
        self.packed: Tensor | None = None  # the weight packed for oneDNN, as the LM head

    def prepack(self) -> bool:
        self.packed = cpu_linear.pack(self.weight)
        return self.packed is not None

    def forward(self, ids: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.clamp_(0, self.rows - 1), self.weight)
        out.masked_fill_(outside[:, None], 0.0)
        return self.parallel.all_reduce(out)

    def logits(self, x: Tensor) -> Tensor:
        """This rank's ``[B, rows]`` slice of the logits (the runner gathers them)."""
        if self.packed is not None:
            return cpu_linear.linear(x, self.weight, self.packed, None)
        return F.linear(x, self.weight)


class PositionEmbedding(nn.Module):
    """OPT's learned positions, offset by 2 (a fairseq legacy): position p is row p + 2."""

    OFFSET = 2

    def __init__(self, max_positions: int, dim: int, *, dtype, device) -> None:
        super().__init__()
        self.weight = _param(max_positions + self.OFFSET, dim, dtype=dtype, device=device)

    def forward(self, positions: Tensor) -> Tensor:
        return F.embedding(positions + self.OFFSET, self.weight)


class OPTLayer(nn.Module):
    def __init__(self, spec: ModelSpec, parallel: ParallelContext, *, dtype, device) -> None:
        super().__init__()
        t = parallel.tp_size
        hidden = spec.hidden_size
        self.num_heads = spec.num_heads // t
        self.head_dim = spec.head_dim
        self.scale = spec.head_dim**-0.5
        self.pre_norm = spec.do_layer_norm_before
        kw = {"dtype": dtype, "device": device}
        self.self_attn_layer_norm = LayerNorm(hidden, **kw)
        self.qkv_proj = Linear(hidden, 3 * self.num_heads * self.head_dim, bias=True, **kw)
        self.out_proj = RowParallelLinear(hidden, hidden, parallel, **kw)
        self.final_layer_norm = LayerNorm(hidden, **kw)
        self.fc1 = Linear(hidden, spec.ffn_dim // t, bias=True, **kw)
        self.fc2 = RowParallelLinear(spec.ffn_dim, hidden, parallel, **kw)

    def forward(self, x: Tensor, meta: AttentionMetadata, kv: KVCache, layer: int) -> Tensor:
        residual = x
        if self.pre_norm:
            x = self.self_attn_layer_norm(x)
        q, k, v = self.qkv_proj(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        kv.write(layer, meta.slot_mapping, k, v)
        attn = paged_attention(q, k, v, kv.k_cache[layer], kv.v_cache[layer], meta, self.scale)
        x = residual + self.out_proj(attn.reshape(x.shape[0], -1))
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        residual = x
        if self.pre_norm:
            x = self.final_layer_norm(x)
        x = residual + self.fc2(self.fc1.forward_relu(x))
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTShard(nn.Module):
    """The part of an OPT model one rank holds. Parameter names follow HF's, minus ``decoder.``,
    with ``layers.{i}`` numbered locally (``layer_start + i`` is the global index) and q/k/v
    fused into ``qkv_proj``."""

    def __init__(self, spec: ModelSpec, parallel: ParallelContext, *, dtype: torch.dtype, device) -> None:
        super().__init__()
        t = parallel.tp_size
        if spec.num_heads % t or spec.ffn_dim % t:
            raise ValueError(
                f"{spec.name}: {spec.num_heads} heads and ffn_dim {spec.ffn_dim} must both divide by tp={t}"
            )
        if spec.num_layers < parallel.pp_size:
            raise ValueError(
                f"{spec.name}: {spec.num_layers} layers cannot fill pp={parallel.pp_size} stages"
            )
        self.spec = spec
        self.parallel = parallel
        self.dtype = dtype
        self.layer_start, self.layer_end = split_range(spec.num_layers, parallel.pp_size, parallel.pp_stage)
        kw = {"dtype": dtype, "device": device}
        hidden, proj = spec.hidden_size, spec.word_embed_proj_dim
        if parallel.is_first_stage:
            self.embed_tokens = VocabParallelEmbedding(spec.vocab_size, proj, parallel, **kw)
            self.embed_positions = PositionEmbedding(spec.max_positions, hidden, **kw)
            self.project_in = Linear(proj, hidden, bias=False, **kw) if proj != hidden else None
        self.layers = nn.ModuleList(
            OPTLayer(spec, parallel, **kw) for _ in range(self.layer_end - self.layer_start)
        )
        if parallel.is_last_stage:
            self.final_layer_norm = LayerNorm(hidden, **kw) if spec.do_layer_norm_before else None
            self.project_out = Linear(hidden, proj, bias=False, **kw) if proj != hidden else None
            if parallel.is_first_stage:
                self.lm_head = self.embed_tokens  # tied: one tensor
            else:
                self.lm_head = VocabParallelEmbedding(spec.vocab_size, proj, parallel, **kw)

    def prepack(self) -> int:
        """Packs every linear (and the LM head) for oneDNN once the weights are loaded; how many were.
        Weights changed after this are not seen by the packed copies: call it again."""
        heads = [self.lm_head] if self.parallel.is_last_stage else []
        return sum(m.prepack() for m in self.modules() if isinstance(m, Linear)) + sum(
            h.prepack() for h in heads
        )

    def packed_weights(self) -> list[tuple[Tensor, Tensor]]:
        """(weight, packed) of every prepacked linear and LM head, in the order a step reads them."""
        linears = [m for m in self.modules() if isinstance(m, Linear)]
        heads = [self.lm_head] if self.parallel.is_last_stage else []
        return [(m.weight, m.packed) for m in [*linears, *heads] if m.packed is not None]

    @property
    def num_local_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        return x + self.embed_positions(positions)

    def forward(self, hidden: Tensor, meta: AttentionMetadata, kv: KVCache) -> Tensor:
        """Runs this stage's layers over ``[T, hidden]`` (from ``embed`` or the previous stage)."""
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, meta, kv, i)
        return hidden

    def logits(self, hidden: Tensor) -> Tensor:
        """``[B, hidden]`` (each job's last token) -> this rank's ``[B, vocab / t]`` logits."""
        if self.final_layer_norm is not None:
            hidden = self.final_layer_norm(hidden)
        if self.project_out is not None:
            hidden = self.project_out(hidden)
        return self.lm_head.logits(hidden)
