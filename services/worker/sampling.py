"""Next-token sampling: greedy at temperature 0, else temperature, min-p, top-k, then top-p;
and the logprobs of what was sampled.

Reproducibility: a job with a seed draws its randomness from a generator seeded with
``mix(seed, sample_index)``, and everything about a row (filtering, noise, choice) is
computed from that row alone, so a token depends on (logits, params, seed, sample_index)
and never on which other jobs share the batch or where the job sits in it. Sampling
uses the exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` per vocabulary entry is
a draw from ``p``; the noise is indexed by token id, so filtering does not shift it.

Logprobs come from the distribution sampled from: the logits after logit_bias, min_tokens
and penalties (see penalties.py), divided by the temperature (a greedy row counts as
temperature 1), before min-p, top-k and top-p filtering -- vLLM's ``processed_logprobs``.
A row that does not ask for them costs nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from fastserve import structured
from fastserve.v1 import common_pb2

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


@dataclass(frozen=True)
class SamplingParams:
    """One job's sampling as the worker uses it (ResolvedSampling with the model's EOS folded in)."""

    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None  # None: the runner's shared generator
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = ()  # masked while fewer than min_tokens were generated
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int = -1  # -1 = none; else the sampled token's and this many alternatives
    prompt_logprobs: int = -1  # -1 = none; else each prompt token's and this many alternatives
    structured: tuple[str, str] | None = None  # a grammar constraint (fastserve.structured.key); None = none

    @property
    def greedy(self) -> bool:
        return self.temperature <= GREEDY_EPS

    @property
    def penalised(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1


GREEDY = SamplingParams()


def from_resolved(s: common_pb2.ResolvedSampling, eos_token_id: int) -> SamplingParams:
    """The worker's view of a job's ResolvedSampling: EOS joins the tokens min_tokens masks unless ignored."""
    stops = tuple(s.stop_token_ids) if s.ignore_eos else (*s.stop_token_ids, eos_token_id)
    return SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_p=s.min_p,
        seed=s.seed,
        min_tokens=s.min_tokens,
        stop_token_ids=stops if s.min_tokens else (),
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        logit_bias=tuple(sorted(s.logit_bias.items())),
        logprobs=s.top_logprobs if s.logprobs else -1,
        prompt_logprobs=s.prompt_top_logprobs if s.prompt_logprobs else -1,
        structured=structured.key(s.structured_outputs) if s.HasField("structured_outputs") else None,
    )


@dataclass(frozen=True)
class TokenLogprobs:
    """One position: the chosen token's logprob and rank (1 = most likely), and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


class Sampler:
    def __init__(self, seed: int, device: torch.device | str) -> None:
        self.device = torch.device(device)
        # Jobs without a seed share this one (reproducible per runner seed and call order).
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        # Seeded rows re-seed this one per row and draw at once: the same stream as a fresh
        # generator per row, without constructing one per row per step.
        self.seeded = torch.Generator(device=self.device)

    def __call__(
        self, logits: Tensor, params: Sequence[SamplingParams], sample_indices: Sequence[int]
    ) -> list[int]:
        """``logits`` ``[B, vocab]`` (already processed) -> one token id per row."""
        tokens = logits.argmax(dim=-1)
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            noise = torch.empty(len(rows), logits.shape[-1], device=logits.device)
            for j, i in enumerate(rows):
                seed = params[i].seed
                generator = self.generator
                if seed is not None:
                    generator = self.seeded.manual_seed(derive_seed(seed, sample_indices[i]))
                noise[j].exponential_(generator=generator)
            index = torch.tensor(rows, device=logits.device)
            tokens[index] = sample(logits.index_select(0, index), [params[i] for i in rows], noise)
        return tokens.tolist()


def logprobs(
    logits: Tensor, params: Sequence[SamplingParams], tokens: Sequence[int]
) -> dict[int, TokenLogprobs]:
    """The logprobs of ``tokens`` (one per row of ``logits`` ``[B, V]``) for the rows that asked."""
    rows = [i for i, p in enumerate(params) if p.logprobs >= 0]
    if not rows:
        return {}
    device = logits.device
    index = torch.tensor(rows, device=device)
    temps = torch.tensor([1.0 if params[i].greedy else params[i].temperature for i in rows], device=device)
    lp = (logits.index_select(0, index).float() / temps[:, None]).log_softmax(dim=-1)
    chosen = torch.tensor([tokens[i] for i in rows], device=device)
    scored = top_logprobs(lp, chosen, max(params[i].logprobs for i in rows))
    return {
        i: TokenLogprobs(s.token_id, s.logprob, s.rank, s.top[: params[i].logprobs])
        for i, s in zip(rows, scored, strict=True)
    }


def top_logprobs(lp: Tensor, chosen: Tensor, k: int) -> list[TokenLogprobs]:
    """Per row of log-probabilities ``lp`` ``[N, V]``: ``chosen``'s logprob and rank, and the top ``k``."""
    k = min(k, lp.shape[-1])
    chosen_lp = lp.gather(1, chosen[:, None])
    ranks = (lp > chosen_lp).sum(dim=-1) + 1
    top_lp, top_ids = lp.topk(k, dim=-1)
    return [
        TokenLogprobs(t, v, r, list(zip(ids, vals, strict=True)))
        for t, v, r, ids, vals in zip(
            chosen.tolist(),
            chosen_lp[:, 0].tolist(),
            ranks.tolist(),
            top_ids.tolist(),
            top_lp.tolist(),
            strict=True,
        )
    ]


def sample(logits: Tensor, params: Sequence[SamplingParams], noise: Tensor) -> Tensor:
    """Draws one token per row of ``logits`` ``[B, V]`` (all rows have temperature > 0) with the
    row's ``Exp(1)`` ``noise`` ``[B, V]``."""
    vocab = logits.shape[-1]
    device = logits.device
    temperatures = [p.temperature for p in params]
    x = logits.float() / torch.tensor(temperatures, device=device, dtype=torch.float32)[:, None]
    # Rows are split by whether they filter, so a row's arithmetic never depends on its neighbours.
    filtered = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1.0 or p.min_p > 0]
    if len(filtered) == len(params):
        probs = _filtered_probs(x, params)
    elif not filtered:
        probs = x.softmax(dim=-1)
    else:
        probs = x.softmax(dim=-1)
        index = torch.tensor(filtered, device=device)
        probs[index] = _filtered_probs(x.index_select(0, index), [params[i] for i in filtered])
    return (probs / noise).argmax(dim=-1)


def _filtered_probs(x: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Softmax of ``x`` ``[B, V]`` without the tokens below min_p x the top probability, then
    restricted to each row's top-k, then to its top-p nucleus (unnormalised: the exponential
    race does not need it)."""
    vocab = x.shape[-1]
    device = x.device
    min_ps = [p.min_p for p in params]
    if any(min_ps):  # p < min_p * p_max  <=>  x < x_max + log(min_p)
        floor = torch.tensor(min_ps, device=device, dtype=torch.float32).log()[:, None]
        x = x.masked_fill(x < x.max(dim=-1, keepdim=True).values + floor, float("-inf"))
    sorted_x, order = x.sort(dim=-1, descending=True)
    ks = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
    ranks = torch.arange(vocab, device=device)
    sorted_x = sorted_x.masked_fill(ranks[None, :] >= ks[:, None], float("-inf"))
    probs = sorted_x.softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass strictly
    # before it is below top_p, so the most likely token always stays.
    before = probs.cumsum(dim=-1) - probs
    ps = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32).clamp_(min=1e-12)
    probs = probs.masked_fill(before >= ps[:, None], 0.0)  # top_p 0: greedy
    return torch.zeros_like(probs).scatter_(-1, order, probs)  # back to vocabulary order
