"""Next-token sampling: greedy at temperature 0, else temperature, top-k, then top-p.

Reproducibility: a job with a seed draws its randomness from a generator seeded with
``mix(seed, sample_index)``, and everything about a row (filtering, noise, choice) is
computed from that row alone, so a token depends on (logits, params, seed, sample_index)
and never on which other jobs share the batch or where the job sits in it. Sampling
uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry is
a draw from ``p``; the noise is indexed by token id, so filtering does not shift it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK64 = 2**64 - 1
GREEDY_EPS = 1e-5  # temperatures at or below this are greedy


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(seed: int, sample_index: int) -> int:
    """A 63-bit generator seed for one (request seed, token index) pair; well mixed, so
    neighbouring seeds or indices give unrelated streams."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (sample_index & _MASK64)) >> 1


class Sampler:
    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        # Jobs without a seed share this one (reproducible per runner seed and call order).
        self.generator = torch.Generator(device=self.device).manual_seed(seed)

    def __call__(
        self,
        logits: Tensor,
        temperatures: Sequence[float],
        top_ps: Sequence[float],
        top_ks: Sequence[int],
        seeds: Sequence[int | None],
        sample_indices: Sequence[int],
    ) -> list[int]:
        """``logits`` ``[B, vocab]`` -> one token id per row."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, t in enumerate(temperatures) if t > GREEDY_EPS]
        if rows:
            generators = [
                self.generator
                if seeds[i] is None
                else torch.Generator(device=self.device).manual_seed(derive_seed(seeds[i], sample_indices[i]))
                for i in rows
            ]
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = sample(
                logits.index_select(0, index),
                [temperatures[i] for i in rows],
                [top_ps[i] for i in rows],
                [top_ks[i] for i in rows],
                generators,
            )
        return tokens.tolist()


def sample(
    logits: Tensor,
    temperatures: Sequence[float],
    top_ps: Sequence[float],
    top_ks: Sequence[int],
    generators: Sequence[torch.Generator],
) -> Tensor:
    """Draws one token per row of ``logits`` ``[B, V]`` (all rows have temperature > 0)."""
    vocab = logits.shape[-1]
    device = logits.device
    x = logits.float() / torch.tensor(temperatures, device=device, dtype=torch.float32)[:, None]
    # Rows are split by whether they filter, so a row's arithmetic never depends on its neighbours.
    filtered = [i for i, (k, p) in enumerate(zip(top_ks, top_ps, strict=True)) if 0 < k < vocab or p < 1.0]
    if len(filtered) == len(temperatures):
        probs = _filtered_probs(x, top_ks, top_ps)
    elif not filtered:
        probs = x.softmax(dim=-1)
    else:
        probs = x.softmax(dim=-1)
        index = torch.tensor(filtered, device=device)
        probs[index] = _filtered_probs(
            x.index_select(0, index), [top_ks[i] for i in filtered], [top_ps[i] for i in filtered]
        )
    noise = torch.stack([torch.empty(vocab, device=device).exponential_(generator=g) for g in generators])
    return (probs / noise).argmax(dim=-1)


def _filtered_probs(x: Tensor, top_ks: Sequence[int], top_ps: Sequence[float]) -> Tensor:
    """Softmax of ``x`` ``[B, V]`` restricted to each row's top-k, then to its top-p nucleus
    (unnormalised: the exponential race does not need it)."""
    vocab = x.shape[-1]
    device = x.device
    sorted_x, order = x.sort(dim=-1, descending=True)
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
    ranks = torch.arange(vocab, device=device)
    sorted_x = sorted_x.masked_fill(ranks[None, :] >= ks[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
    # before it is below top_p, so the most likely token always stays.
    before = probs.cumsum(dim=-1) - probs
    ps = torch.tensor(top_ps, device=device, dtype=torch.float32).clamp_(min=1e-12)  # top_p 0: greedy
    probs = probs.masked_fill(before >= ps[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, probs)  # back to vocabulary order
