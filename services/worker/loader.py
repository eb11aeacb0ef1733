"""Fills an `OPTShard`'s parameters: from a Hugging Face OPT checkpoint, or with dummy weights.

`shard_plan` says, for every local parameter, which slices of which checkpoint tensors it
is made of (q/k/v rows of this rank's heads, fc1 rows / fc2 columns of its ffn slice,
vocabulary rows of the embedding, ...). Checkpoint loading reads exactly those slices:
safetensors through ``safe_open(...).get_slice`` (a rank never materialises a tensor it
does not own), ``pytorch_model.bin`` through a memory-mapped ``torch.load``. Dummy weights
generate the same slices from a seed, on the target device, so a rank allocates only its
shard either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .model import OPTShard

log = logging.getLogger("fastserve.worker.loader")

EMBED = "decoder.embed_tokens.weight"
LM_HEAD = "lm_head.weight"
DUMMY_STD = 0.02  # OPT's init_std
# byte-tokenizer ids (byte + 4) of printable ASCII and newline: see _keep_printable
PRINTABLE_BYTE_IDS = frozenset(b + 4 for b in (*range(32, 127), 10))


@dataclass(frozen=True)
class Piece:
    """Rows (``dim`` 0) or columns (``dim`` 1) ``[start, end)`` of checkpoint tensor ``name``; whole if dim is None.

    ``end`` may run past the tensor (a padded vocabulary shard): the missing rows are zeros.
    """

    name: str
    dim: int | None = None
    start: int = 0
    end: int = 0


def shard_plan(model: OPTShard, *, has_lm_head: bool = False) -> dict[str, list[Piece]]:
    """Local parameter name -> the checkpoint pieces it is the concatenation (along dim 0) of."""
    spec, par = model.spec, model.parallel
    t, r = par.tp_size, par.tp_rank
    head_lo, head_hi = r * spec.num_heads // t * spec.head_dim, (r + 1) * spec.num_heads // t * spec.head_dim
    ffn_lo, ffn_hi = r * spec.ffn_dim // t, (r + 1) * spec.ffn_dim // t
    plan: dict[str, list[Piece]] = {}
    for name, _ in model.named_parameters():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            source = LM_HEAD if name == "lm_head.weight" and has_lm_head else EMBED
            module = model.lm_head if name == "lm_head.weight" else model.embed_tokens
            plan[name] = [Piece(source, 0, module.vocab_start, module.vocab_start + module.rows)]
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)\.(weight|bias)", name)
        if m is None:  # embed_positions, project_in/out, final_layer_norm: replicated
            plan[name] = [Piece(f"decoder.{name}")]
            continue
        layer, module, kind = int(m[1]) + model.layer_start, m[2], m[3]
        prefix = f"decoder.layers.{layer}"
        if module == "qkv_proj":
            plan[name] = [Piece(f"{prefix}.self_attn.{p}_proj.{kind}", 0, head_lo, head_hi) for p in "qkv"]
        elif module == "out_proj":
            full = kind == "bias"
            plan[name] = [Piece(f"{prefix}.self_attn.out_proj.{kind}", None if full else 1, head_lo, head_hi)]
        elif module == "fc1":
            plan[name] = [Piece(f"{prefix}.fc1.{kind}", 0, ffn_lo, ffn_hi)]
        elif module == "fc2":
            plan[name] = [Piece(f"{prefix}.fc2.{kind}", None if kind == "bias" else 1, ffn_lo, ffn_hi)]
        else:  # the two layer norms
            plan[name] = [Piece(f"{prefix}.{module}.{kind}")]
    return plan


def canonical(key: str) -> str:
    """HF key -> ``decoder.*`` / ``lm_head.weight`` (checkpoints of OPTForCausalLM say ``model.decoder.*``)."""
    return key.removeprefix("model.")


class CheckpointReader:
    """Reads slices of the tensors of a HF checkpoint directory (safetensors or .bin, sharded or not)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.files: dict[str, tuple[Path, str]] = {}  # canonical name -> (file, key in file)
        self._stack = ExitStack()
        self._open: dict[Path, object] = {}
        for index, single in (
            ("model.safetensors.index.json", "model.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model.bin"),
        ):
            if (self.directory / index).is_file():
                weight_map = json.loads((self.directory / index).read_text())["weight_map"]
                for key, file in weight_map.items():
                    self.files[canonical(key)] = (self.directory / file, key)
                break
            if (self.directory / single).is_file():
                for key in self._keys(self.directory / single):
                    self.files[canonical(key)] = (self.directory / single, key)
                break
        else:
            raise FileNotFoundError(
                f"{self.directory} holds no model.safetensors[.index.json] or pytorch_model.bin[.index.json]"
            )

    def _handle(self, path: Path):
        if path not in self._open:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                self._open[path] = self._stack.enter_context(
                    safe_open(str(path), framework="pt", device="cpu")
                )
            else:
                try:  # memory-mapped: only the slices read are paged in
                    self._open[path] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                except RuntimeError:  # legacy (non-zip) format cannot be mapped
                    self._open[path] = torch.load(path, map_location="cpu", weights_only=True)
        return self._open[path]

    def _keys(self, path: Path) -> list[str]:
        handle = self._handle(path)
        return list(handle.keys())

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, piece: Piece) -> Tensor:
        if piece.name not in self.files:
            raise KeyError(f"{self.directory}: checkpoint has no tensor {piece.name!r}")
        path, key = self.files[piece.name]
        handle = self._handle(path)
        full = handle.get_slice(key) if path.suffix == ".safetensors" else handle[key]
        if piece.dim is None:
            return full[:] if path.suffix == ".safetensors" else full
        size = full.get_shape()[piece.dim] if path.suffix == ".safetensors" else full.shape[piece.dim]
        end = min(piece.end, size)
        part = full[piece.start : end] if piece.dim == 0 else full[:, piece.start : end]
        if end < piece.end:  # vocabulary padding past the real rows
            pad = list(part.shape)
            pad[piece.dim] = piece.end - end
            part = torch.cat([part, part.new_zeros(pad)], dim=piece.dim)
        return part

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


@torch.inference_mode()
def load_checkpoint(model: OPTShard, directory: str | Path) -> None:
    reader = CheckpointReader(directory)
    try:
        plan = shard_plan(model, has_lm_head=LM_HEAD in reader)
        params = dict(model.named_parameters())
        for name, pieces in plan.items():
            tensor = (
                torch.cat([reader.read(p) for p in pieces]) if len(pieces) > 1 else reader.read(pieces[0])
            )
            param = params[name]
            if tensor.shape != param.shape:
                raise ValueError(
                    f"{directory}: {name} is {tuple(tensor.shape)} in the checkpoint, expected {tuple(param.shape)}"
                )
            param.copy_(tensor)
    finally:
        reader.close()


def _piece_seed(seed: int, piece: Piece) -> int:
    digest = hashlib.blake2b(f"{seed}|{piece}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@torch.inference_mode()
def init_dummy(model: OPTShard, seed: int) -> None:
    """Deterministic dummy weights: OPT's init (normal(0, 0.02) matrices, zero biases, unit norms).

    Each piece is generated on the parameter's device from a seed derived from (seed, piece),
    so a rank draws only its shard, and the tied LM head on the last stage equals stage 0's
    embedding.
    """
    params = dict(model.named_parameters())
    for name, pieces in shard_plan(model).items():
        param = params[name]
        if name.endswith("bias"):
            param.zero_()
        elif "layer_norm" in name:
            param.fill_(1.0)
        else:
            parts = param.split([p.end - p.start for p in pieces]) if len(pieces) > 1 else [param]
            for part, piece in zip(parts, pieces, strict=True):
                gen = torch.Generator(device=param.device).manual_seed(_piece_seed(seed, piece))
                part.normal_(0.0, DUMMY_STD, generator=gen)
                if model.spec.tokenizer == "byte" and piece.name in (EMBED, LM_HEAD):
                    _keep_printable(part, piece.start)


def _keep_printable(rows: Tensor, first_id: int) -> None:
    """Zeroes the vocabulary rows of every id but printable bytes.

    Their logits through the tied head are then 0 while about half the printable ones are
    positive, so greedy decoding of the dummy `opt-tiny` prints readable (if meaningless)
    text in the `fastserve up` demo instead of control bytes and broken UTF-8.
    """
    for local in range(rows.shape[0]):
        if first_id + local not in PRINTABLE_BYTE_IDS:
            rows[local].zero_()
