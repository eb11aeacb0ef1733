"""The output-length predictor: the split by conversation, the features, the fit, the metrics."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from fastserve.bench.length_predictor import (
    conversation_key,
    design,
    is_test,
    kendall_tau,
    load,
    pairs,
    predict_log,
    ridge,
)
from fastserve.services.scheduler.length_predictor import LENGTH_BINS, LengthPredictor, features, width


def test_conversation_key_drops_only_a_numeric_chunk_suffix():
    assert conversation_key("QWJhYvA_0") == "QWJhYvA"
    assert conversation_key("QWJhYvA_12") == "QWJhYvA"
    assert conversation_key("QWJhYvA") == "QWJhYvA"
    assert conversation_key("a_b") == "a_b"
    assert conversation_key("a_b_3") == "a_b"


def test_every_chunk_of_a_conversation_falls_on_one_side_and_both_sides_are_used():
    stems = [f"c{k:05d}x" for k in range(400)]
    sides = {s: {is_test(f"{s}_{n}") for n in range(6)} for s in stems}
    assert all(len(v) == 1 for v in sides.values())
    share = sum(v == {True} for v in sides.values()) / len(stems)
    assert 0.35 < share < 0.65


def test_the_real_pipeline_splits_a_dataset_file_by_conversation(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTSERVE_CACHE_DIR", str(tmp_path / "cache"))
    rng = random.Random(0)
    records = []
    for k in range(60):
        for n in range(rng.randint(1, 4)):  # 1-4 chunks per conversation, as ShareGPT V3 splits them
            turns = [
                {"from": "human", "value": "q" * rng.randint(5, 50)},
                {"from": "gpt", "value": "a" * rng.randint(5, 50)},
            ]
            records.append({"id": f"conv{k}_{n}", "conversations": turns})
    path = tmp_path / "sharegpt.json"
    text = json.dumps(records)
    path.write_text(text[: len(text) - 40])  # cut short mid-record, as the packaged copy is
    data = load("byte", "first", str(path))
    assert 0 < len(data["outputs"]) < len(records)  # the cut record is dropped
    by_conversation: dict[int, set[bool]] = {}
    for key, side in zip(data["conversation"].tolist(), data["test"].tolist(), strict=True):
        by_conversation.setdefault(key, set()).add(side)
    assert all(len(sides) == 1 for sides in by_conversation.values())
    assert {True, False} == set(data["test"].tolist())
    first = data["ids"][data["offsets"][0] : data["offsets"][1]]
    assert first[0] == 2 and len(first) == len(records[0]["conversations"][0]["value"]) + 1  # BOS + bytes


def test_human_pairs_skip_a_conversation_that_opens_with_the_assistant():
    records = [
        {
            "id": "a_0",
            "conversations": [
                {"from": "gpt", "value": "hi"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ],
        },
        {"id": "b_0", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
    ]
    assert list(pairs(iter(records), "first")) == [("a_0", "hi", "Q"), ("b_0", "q", "a")]
    assert list(pairs(iter(records), "human")) == [("a_0", "Q", "A"), ("b_0", "q", "a")]


def test_features_see_order_length_and_are_deterministic():
    dim = 1 << 12
    ids = np.array([5, 9, 11, 5, 7])
    cols, values = features(ids, dim)
    again_cols, again_values = features(ids.tolist(), dim)
    assert cols.tolist() == again_cols.tolist() and values.tolist() == again_values.tolist()
    grams = 5 + 4 + 3
    assert values[:-2].sum() == pytest.approx(grams / np.sqrt(grams))  # counts scaled by 1/sqrt(n-grams)
    assert cols[-1] == dim + LENGTH_BINS and cols[-2] == dim + 2  # bias; length bin of 5 tokens: log2 -> 2
    swapped_cols, _ = features(ids[::-1], dim)
    assert set(swapped_cols[:-2]) != set(cols[:-2])  # bigrams differ though the unigrams do not
    assert max(cols) < width(dim)
    assert features(np.array([], dtype=np.int64), dim)[0].tolist() == [dim, dim + LENGTH_BINS]


def test_ridge_learns_which_tokens_mean_long_answers_and_the_model_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    dim = 1 << 10
    prompts, outputs = [], []
    for _ in range(400):
        ids = rng.integers(10, 200, size=rng.integers(5, 30))
        long = rng.random() < 0.5
        if long:
            ids[rng.integers(len(ids))] = 3  # "write an essay"
        prompts.append(ids)
        outputs.append(400 if long else 20)
    y = np.log(np.array(outputs, dtype=float))
    x = design(prompts, dim)
    w = ridge(x, len(prompts), width(dim), y - y.mean(), 1.0)
    w[-1] += y.mean()
    pred = predict_log(x, len(prompts), w)
    long = np.array(outputs) == 400
    assert pred[long].min() > pred[~long].max()  # every long answer ranked above every short one
    model = LengthPredictor(w.astype(np.float32), dim, 0.5, "byte")
    model.save(str(tmp_path / "m.npz"))
    loaded = LengthPredictor.load(str(tmp_path / "m.npz"))
    assert (loaded.dim, loaded.sigma, loaded.tokenizer) == (dim, 0.5, "byte")
    assert loaded.predict([3, 50, 60]) > 4 * loaded.predict([40, 50, 60])


def test_kendall_tau_b_matches_the_hand_count():
    # pairs of (1,1) (2,3) (3,2): concordant (1,2) (1,3), discordant (2,3): (2 - 1) / 3
    assert kendall_tau(np.array([1, 2, 3]), np.array([1, 3, 2])) == pytest.approx(1 / 3)
    assert kendall_tau(np.arange(10), np.arange(10) * 2) == pytest.approx(1.0)
    # a tie in one variable: tau-b divides by the pairs untied in each
    assert kendall_tau(np.array([1, 1, 2]), np.array([1, 2, 3])) == pytest.approx(2 / np.sqrt(2 * 3))
