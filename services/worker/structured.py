"""Constrained decoding on the driver rank: one xgrammar matcher per constrained job.

A job's matcher is (re)built from the tokens it generated so far whenever the step feeds its
whole context (its first prefill, and every recompute: after a preemption that dropped its KV,
a worker restart or a scheduler restart), so its state never depends on what this process
remembers; otherwise it advances by the token sampled for the job. Swapping moves only KV
blocks, so a swapped job keeps its matcher. Grammars compile once per distinct constraint (the
last CACHE_SIZE used stay cached), on a thread of their own: a step waits only for a constraint it
has not seen lately.

A step with no constrained row costs one attribute test per row.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from fastserve import structured

if TYPE_CHECKING:
    from .runner import SeqWork

log = logging.getLogger("fastserve.worker.structured")


def tokenizer_info(tokenizer_name: str, vocab_size: int, eos_token_id: int):
    """xgrammar's view of the model's vocabulary: a Hugging Face tokenizer's, or the byte tokenizer's."""
    import xgrammar as xgr

    from fastserve.tokenizer import BYTE_OFFSET, HFTokenizer, load_tokenizer

    tokenizer = load_tokenizer(tokenizer_name)
    if isinstance(tokenizer, HFTokenizer):
        return xgr.TokenizerInfo.from_huggingface(
            tokenizer.inner, vocab_size=vocab_size, stop_token_ids=[eos_token_id]
        )
    # the byte tokenizer: byte b is id b + 4; the specials and the padding are empty (xgrammar
    # never allows an empty token, except a stop token where the grammar may end)
    vocab = [b""] * BYTE_OFFSET + [bytes([b]) for b in range(256)]
    vocab += [b""] * (vocab_size - len(vocab))
    return xgr.TokenizerInfo(
        vocab, vocab_type=xgr.VocabType.RAW, vocab_size=vocab_size, stop_token_ids=[eos_token_id]
    )


class Grammars:
    """Compiled grammars (the last `cache_size` constraints used, as the gateway's parse cache)
    and the matchers of the constrained jobs."""

    def __init__(self, tokenizer_name: str, vocab_size: int, eos_token_id: int) -> None:
        self.tokenizer_name = tokenizer_name
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self._compiler = None
        self._compiling = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()  # least recently used first
        self.cache_size = structured.CACHE_SIZE
        self.matchers: dict[str, object] = {}

    def compile(self, key: tuple[str, str]) -> Future:
        """The compiled grammar of `key` (kind, text), compiling it once in the background."""
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._compiling.submit(self._compile, key)
            while len(self._compiled) > self.cache_size:  # a job's matcher keeps its own grammar
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(key)
        return future

    def _compile(self, key: tuple[str, str]):
        import xgrammar as xgr

        if self._compiler is None:
            info = tokenizer_info(self.tokenizer_name, self.vocab_size, self.eos_token_id)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler.compile_grammar(structured.grammar(*key))

    def forget(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.matchers.pop(rid, None)

    def mask(self, logits: torch.Tensor, seqs: Sequence[SeqWork], rows: list[int]) -> None:
        """Sets the logits of the tokens each constrained row's grammar forbids to -inf, in place."""
        import xgrammar as xgr

        for k in rows:
            s = seqs[k]
            if s.start_pos == 0 or s.request_id not in self.matchers:
                if s.start_pos and s.sample_index:
                    raise ValueError(f"{s.request_id}: constrained, but this rank never saw its prefill")
                self._start(s)
        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for j, k in enumerate(rows):
            matcher = self.matchers[seqs[k].request_id]
            if not matcher.is_terminated():
                matcher.fill_next_token_bitmask(bitmask, j)
            else:  # only reachable with ignore_eos: past the grammar's end, anything goes but stays logged
                bitmask[j].fill_(-1)
        picked = logits[rows] if len(rows) < logits.shape[0] else logits
        xgr.apply_token_bitmask_inplace(picked, bitmask.to(logits.device), vocab_size=self.vocab_size)
        if picked is not logits:
            logits[rows] = picked

    def accept(self, seqs: Sequence[SeqWork], rows: list[int], tokens: Sequence[int]) -> None:
        """Advances each constrained row's matcher by the token sampled for it."""
        for k in rows:
            matcher = self.matchers[seqs[k].request_id]
            if not matcher.is_terminated() and not matcher.accept_token(tokens[k]):
                log.warning("%s: token %d is outside its grammar", seqs[k].request_id, tokens[k])

    def _start(self, s: SeqWork) -> None:
        import xgrammar as xgr

        matcher = xgr.GrammarMatcher(self.compile(s.sampling.structured).result())
        generated = s.token_ids[len(s.token_ids) - s.sample_index :] if s.sample_index else []
        for token in generated:
            if not matcher.accept_token(token):
                log.warning("%s: rebuilding its grammar state, token %d is outside it", s.request_id, token)
                break
        self.matchers[s.request_id] = matcher
