"""What model a deployment serves: an OPT configuration, however it was obtained.

`resolve_model` accepts a preset name (dummy weights, as the paper's artifact uses for
the big OPT shapes), a local Hugging Face checkpoint directory, or a hub id. This module
is shared by every service (the scheduler and gateway only need the tokenizer name and
shapes), so it imports neither torch nor transformers: config.json is read as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from fastserve.hub import hub_reachable

OPT_VOCAB = 50272  # every released OPT model: 50265 BPE tokens padded to a multiple of 8


@dataclass(frozen=True)
class ModelSpec:
    """An OPT configuration (the fields of HF's OPTConfig that the worker needs)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    max_positions: int
    word_embed_proj_dim: int
    do_layer_norm_before: bool
    pad_token_id: int
    bos_token_id: int
    eos_token_id: int
    checkpoint: str | None  # local dir of a HF checkpoint, or None for dummy weights
    tokenizer: str  # "byte" for the byte-level tokenizer, else a HF tokenizer name/dir

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def num_params(self) -> int:
        """Parameters of the whole model (lm_head tied to embed_tokens, so counted once)."""
        h, f, e = self.hidden_size, self.ffn_dim, self.word_embed_proj_dim
        per_layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 4 * h  # attention, ffn, two layer norms
        embeds = self.vocab_size * e + (self.max_positions + 2) * h
        projections = 2 * h * e if e != h else 0
        final_norm = 2 * h if self.do_layer_norm_before else 0
        return self.num_layers * per_layer + embeds + projections + final_norm


def _opt(name: str, hidden: int, layers: int, heads: int, *, proj: int | None = None, pre_ln: bool = True):
    return ModelSpec(
        name=name,
        vocab_size=OPT_VOCAB,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        ffn_dim=4 * hidden,
        max_positions=2048,
        word_embed_proj_dim=proj or hidden,
        do_layer_norm_before=pre_ln,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        checkpoint=None,
        tokenizer=f"facebook/{name}",
    )


# Dummy-weight presets. opt-tiny pairs with the byte tokenizer (fastserve.tokenizer):
# ids 0-3 are OPT's specials (pad 1, bos = eos 2, unk 3), byte b is id b + 4, and the
# vocabulary is padded from 260 to 272 (a multiple of 16, so it splits across TP ranks).
PRESETS: dict[str, ModelSpec] = {
    "opt-tiny": replace(
        _opt("opt-tiny", 128, 4, 4), vocab_size=272, ffn_dim=512, tokenizer="byte", name="opt-tiny"
    ),
    "opt-125m": _opt("opt-125m", 768, 12, 12),
    "opt-350m": _opt("opt-350m", 1024, 24, 16, proj=512, pre_ln=False),
    "opt-1.3b": _opt("opt-1.3b", 2048, 24, 32),
    "opt-2.7b": _opt("opt-2.7b", 2560, 32, 32),
    "opt-6.7b": _opt("opt-6.7b", 4096, 32, 32),
    "opt-13b": _opt("opt-13b", 5120, 40, 40),
    "opt-30b": _opt("opt-30b", 7168, 48, 56),
    "opt-66b": _opt("opt-66b", 9216, 64, 72),
    "opt-175b": _opt("opt-175b", 12288, 96, 96),
}


def spec_from_config(config: dict, *, name: str, checkpoint: str | None, tokenizer: str) -> ModelSpec:
    """A ModelSpec from the dict of a HF OPT config.json; rejects OPT variants the worker does not run."""
    if config.get("model_type", "opt") != "opt":
        raise ValueError(f"{name}: model_type {config.get('model_type')!r} is not 'opt'")
    unsupported = {
        "activation_function": (config.get("activation_function", "relu"), "relu"),
        "enable_bias": (config.get("enable_bias", True), True),
        "layer_norm_elementwise_affine": (config.get("layer_norm_elementwise_affine", True), True),
        "_remove_final_layer_norm": (config.get("_remove_final_layer_norm", False), False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"{name}: {key}={got!r} is not supported (the worker implements {want!r})")
    hidden = int(config["hidden_size"])
    return ModelSpec(
        name=name,
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(config["num_hidden_layers"]),
        num_heads=int(config["num_attention_heads"]),
        ffn_dim=int(config["ffn_dim"]),
        max_positions=int(config["max_position_embeddings"]),
        word_embed_proj_dim=int(config.get("word_embed_proj_dim") or hidden),
        do_layer_norm_before=bool(config.get("do_layer_norm_before", True)),
        pad_token_id=int(config.get("pad_token_id", 1)),
        bos_token_id=int(config.get("bos_token_id", 2)),
        eos_token_id=int(config.get("eos_token_id", 2)),
        checkpoint=checkpoint,
        tokenizer=tokenizer,
    )


def _from_directory(path: Path, name: str) -> ModelSpec:
    config = json.loads((path / "config.json").read_text())
    return spec_from_config(config, name=name, checkpoint=str(path), tokenizer=str(path))


def resolve_model(name_or_path: str) -> ModelSpec:
    """A preset name, a local checkpoint directory (with config.json), or a Hugging Face hub id.

    The spec's ``name`` resolves to the same spec again (other services call this with
    the name a worker reports), so a directory is named by its absolute path.
    """
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model directory {name_or_path!r} has no config.json")
        return _from_directory(path.resolve(), str(path.resolve()))
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "*.bin", "*.txt", "*.model"],
            local_files_only=not hub_reachable(),
        )
    except Exception as exc:  # noqa: BLE001 - any failure means the model cannot be had here
        raise ValueError(
            f"model {name_or_path!r} is not a preset ({', '.join(PRESETS)}), not a local directory with a "
            f"config.json, and could not be downloaded from the Hugging Face hub: {type(exc).__name__}: {exc}"
        ) from exc
    spec = _from_directory(Path(local), name_or_path)
    return replace(spec, tokenizer=local)
