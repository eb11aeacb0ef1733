"""Turns the scheduler's token stream into text deltas, watching for stop strings."""

from __future__ import annotations

from fastserve.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    """Text is held back only as long as it could still be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...], include_stop: bool = False) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = stop
        self.include_stop = include_stop  # include_stop_str_in_output: the text ends after the match
        self.pending = ""  # decoded, not yet sent
        self.stopped = False
        self.matched = ""  # the stop string that matched

    def add(self, token_ids: list[int]) -> str:
        """The text that can be sent now; sets `stopped` when a stop string matched."""
        self.pending += self.detok.add(token_ids)
        return self._release(final=False)

    def finish(self) -> str:
        self.pending += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [(i, -len(s), s) for i, s in ((self.pending.find(s), s) for s in self.stop) if i >= 0]
        if hits:
            at, _, self.matched = min(hits)  # the earliest match; the longest of those starting there
            self.stopped = True
            end = at + len(self.matched) if self.include_stop else at
            out, self.pending = self.pending[:end], ""
            return out
        if final:
            out, self.pending = self.pending, ""
            return out
        keep = max(len(s) for s in self.stop) - 1  # a stop string may straddle this and the next delta
        cut = max(len(self.pending) - keep, 0)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out
