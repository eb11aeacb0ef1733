"""An OPT checkpoint with random weights and a tokenizer that names every id, built locally.

For serving benchmarks that compare FastServe with another server on one checkpoint without
the hub: OPT-125m's shape by default (hidden 768, 12 layers, 12 heads, vocabulary 50272), fp32.
The tokenizer is word-level: id i is the word `t<i>` (ids 0-3 are OPT's `<s> <pad> </s> <unk>`,
`</s>` starts every prompt as OPT's does), so any token id a benchmark draws is a valid prompt
token for both servers, and a text of such words encodes back to the same ids.
"""

from __future__ import annotations

from pathlib import Path

import torch

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")


def make_checkpoint(
    path: Path,
    *,
    layers: int = 12,
    hidden: int = 768,
    vocab: int = 50272,
    max_positions: int = 2048,
    std: float = 0.1,
    seed: int = 0,
) -> Path:
    """Saves the model and its tokenizer to `path` and returns it.

    Every weight is drawn from N(0, std) (layer-norm scales around 1): wide enough that greedy
    choices are not near-ties that two correct implementations could break differently."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        ffn_dim=4 * hidden,
        max_position_embeddings=max_positions,
        word_embed_proj_dim=hidden,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_((1.0 if "layer_norm.weight" in name else 0.0) + std * torch.randn_like(param))
    model.save_pretrained(path)
    word_tokenizer(vocab).save_pretrained(path)
    return path


def word_tokenizer(vocab: int):
    """A Hugging Face fast tokenizer whose id i is `t<i>` (the specials below 4)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = {name: i for i, name in enumerate(SPECIALS)} | {f"t{i}": i for i in range(len(SPECIALS), vocab)}
    inner = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, bos_token="</s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
