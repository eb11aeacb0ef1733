"""Tiny Hugging Face OPT checkpoints for tests (no hub access needed)."""

from __future__ import annotations

from pathlib import Path

import torch

BYTE_VOCAB = 272  # the byte tokenizer's vocabulary (fastserve.tokenizer), padded to a multiple of 16


def make_tiny_opt_checkpoint(
    path: str | Path,
    *,
    layers: int = 4,
    heads: int = 4,
    hidden: int = 64,
    ffn: int = 128,
    vocab: int = BYTE_VOCAB,
    max_positions: int = 256,
    seed: int = 0,
    word_embed_proj_dim: int | None = None,
    do_layer_norm_before: bool = True,
    safe_serialization: bool = True,
    max_shard_size: str | None = None,
    std: float = 0.2,
) -> Path:
    """Saves a randomly initialised ``OPTForCausalLM`` to ``path`` (created if needed) and returns it.

    Every parameter (layer norms and biases included) is drawn from N(0, std) around its
    HF init, with ``std`` large enough that next-token logits are well separated: greedy
    comparisons against transformers then do not hinge on near-ties.
    """
    from transformers import OPTConfig, OPTForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=ffn,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=word_embed_proj_dim or hidden,
        do_layer_norm_before=do_layer_norm_before,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        dropout=0.0,
        attention_dropout=0.0,
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if "layer_norm.weight" in name else 0.0
            param.copy_(base + std * torch.randn_like(param))
    kwargs = {"safe_serialization": safe_serialization}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path
