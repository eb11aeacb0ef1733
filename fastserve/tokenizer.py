"""Tokenizers and incremental detokenization.

`ByteTokenizer` serves the `opt-tiny` preset with no download: ids 0-3 are OPT's
specials (pad 1, bos/eos 2, unk 3) and byte b is id b + 4. Other models use their
Hugging Face tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from fastserve.hub import hub_reachable

log = logging.getLogger("fastserve.tokenizer")

BYTE_OFFSET = 4


class Tokenizer(Protocol):
    eos_token_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    bos_token_id = 2
    eos_token_id = 2

    def encode(self, text: str) -> list[int]:
        return [self.bos_token_id, *(b + BYTE_OFFSET for b in text.encode("utf-8"))]

    def decode(self, ids: list[int]) -> str:
        data = bytes(i - BYTE_OFFSET for i in ids if BYTE_OFFSET <= i < BYTE_OFFSET + 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    def __init__(self, name_or_path: str, local_files_only: bool = False) -> None:
        from transformers import AutoTokenizer

        self.inner = AutoTokenizer.from_pretrained(name_or_path, local_files_only=local_files_only)
        if len(self.inner) <= 1:  # a checkpoint saved without tokenizer files loads as an empty one
            raise ValueError(f"{name_or_path}: the tokenizer has no vocabulary")
        self.eos_token_id = int(self.inner.eos_token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.inner.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(ids, skip_special_tokens=True)


def load_tokenizer(name: str) -> Tokenizer:
    """`byte`, or a Hugging Face tokenizer directory / hub id; falls back to bytes when that has none.

    A directory is read without asking the hub; a hub id goes to the hub only when it answers
    (else it comes from the local cache, if there): huggingface_hub retries an unreachable hub
    with backoff, which held the gateway's start for ~50 s."""
    if name == "byte":
        return ByteTokenizer()
    try:
        return HFTokenizer(name, local_files_only=Path(name).is_dir() or not hub_reachable())
    except Exception as exc:  # noqa: BLE001 - any failure to load means no tokenizer here
        log.warning(
            "no Hugging Face tokenizer at %r (%s); using the byte-level tokenizer for text", name, exc
        )
        return ByteTokenizer()


class IncrementalDetokenizer:
    """Turns a growing token list into text deltas that never split a character.

    Decodes only a short window (the tokens since the last emitted text, plus the
    ones before them for context) so a long generation costs O(n), not O(n^2).
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        if full_text.endswith("\ufffd") or len(full_text) <= len(prefix_text):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """What is still held back, decoded as is (at the end of the stream)."""
        prefix_text = self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset])
        full_text = self.tokenizer.decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full_text[len(prefix_text) :]
