"""What the driver rank does to the logits before sampling, with vLLM's definitions and order.

1. logit_bias: added to the named tokens' logits.
2. min_tokens: until a job has generated that many tokens, its stop tokens (stop_token_ids,
   and EOS unless ignore_eos) get -inf.
3. Penalties, from the job's own tokens: repetition_penalty r divides a positive logit by r
   and multiplies a negative one by r for every token in the prompt or generated so far;
   frequency_penalty f subtracts f x (times generated); presence_penalty p subtracts p if
   generated at least once (neither looks at the prompt).

Every step works on the rows that need it only: a plain job in the batch costs a few
attribute checks. Penalised jobs keep their token counts in one ``[slots, vocab]`` table
on the device, so a step gathers, penalises and updates all of them at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .sampling import SamplingParams


class TokenCounts:
    """Per penalised job: how often each token was generated and which tokens its prompt holds."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.slots: dict[str, int] = {}
        self.free: list[int] = []
        self.counts = torch.zeros(0, vocab_size, device=device)
        self.in_prompt = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self.slots

    def start(self, request_id: str, prompt: Sequence[int], generated: Sequence[int]) -> None:
        """(Re)builds a job's counts from its whole context (a prefill)."""
        slot = self.slots.get(request_id)
        if slot is None:
            slot = self._allocate()
            self.slots[request_id] = slot
        self.counts[slot].zero_()
        self.in_prompt[slot].zero_()
        self.in_prompt[slot, torch.tensor(list(prompt), dtype=torch.int64, device=self.device)] = True
        if generated:
            ids = torch.tensor(list(generated), dtype=torch.int64, device=self.device)
            self.counts[slot].index_add_(0, ids, torch.ones(len(ids), device=self.device))

    def add(self, request_ids: Sequence[str], tokens: Sequence[int]) -> None:
        """Counts one generated token per job, all at once."""
        slots = torch.tensor([self.slots[r] for r in request_ids], dtype=torch.int64, device=self.device)
        ids = torch.tensor(list(tokens), dtype=torch.int64, device=self.device)
        self.counts.index_put_((slots, ids), torch.ones(len(ids), device=self.device), accumulate=True)

    def forget(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            slot = self.slots.pop(rid, None)
            if slot is not None:
                self.free.append(slot)

    def rows(self, request_ids: Sequence[str]) -> tuple[Tensor, Tensor]:
        slots = torch.tensor([self.slots[r] for r in request_ids], dtype=torch.int64, device=self.device)
        return self.counts.index_select(0, slots), self.in_prompt.index_select(0, slots)

    def _allocate(self) -> int:
        if not self.free:
            old = len(self.counts)
            grow = max(old, 8)
            self.counts = torch.cat([self.counts, torch.zeros(grow, self.vocab_size, device=self.device)])
            self.in_prompt = torch.cat(
                [self.in_prompt, torch.zeros(grow, self.vocab_size, dtype=torch.bool, device=self.device)]
            )
            self.free.extend(range(old + grow - 1, old - 1, -1))
        return self.free.pop()


def process_logits(
    logits: Tensor,
    params: Sequence[SamplingParams],
    sample_indices: Sequence[int],
    request_ids: Sequence[str],
    counts: TokenCounts,
) -> Tensor:
    """Applies logit_bias, min_tokens and the penalties in place to ``logits`` ``[B, V]`` (float32)."""
    device = logits.device
    bias = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if bias:
        rows, ids, values = zip(*bias, strict=True)
        logits.index_put_(
            (torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
            torch.tensor(values, dtype=logits.dtype, device=device),
            accumulate=True,
        )
    masked = [
        (i, t) for i, p in enumerate(params) if sample_indices[i] < p.min_tokens for t in p.stop_token_ids
    ]
    if masked:
        rows, ids = zip(*masked, strict=True)
        logits[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = float("-inf")
    penalised = [i for i, p in enumerate(params) if p.penalised]
    if penalised:
        index = torch.tensor(penalised, device=device)
        generated, in_prompt = counts.rows([request_ids[i] for i in penalised])
        x = logits.index_select(0, index)
        rep = torch.tensor([params[i].repetition_penalty for i in penalised], device=device)[:, None]
        freq = torch.tensor([params[i].frequency_penalty for i in penalised], device=device)[:, None]
        pres = torch.tensor([params[i].presence_penalty for i in penalised], device=device)[:, None]
        seen = generated > 0
        x = torch.where(in_prompt | seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * generated - pres * seen.float()
        logits.index_copy_(0, index, x)
    return logits
