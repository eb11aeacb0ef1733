"""Quantile-calibrate a predicted trace: same ranking, the spread of the true lengths.

    python -m fastserve.bench.calibrate_predictions docs/results/sharegpt_real_test_predicted.jsonl \\
        docs/results/sharegpt_real_test_calibrated.jsonl

The ridge model's predictions are compressed towards the mean (log-std 1.16 against the true
1.58), which a ranking metric does not see but SRPT on predicted *remaining* tokens does. This
maps each prediction's rank among the file's predictions (no true lengths read) to the same
quantile of the train half's true output lengths (bench/length_predictor.py's cached data:
labels of the train half only), so Kendall tau is unchanged and the spread is the truth's.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fastserve.bench.length_predictor import load


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.calibrate_predictions", description=__doc__
    )
    parser.add_argument("trace", help="JSONL with predicted_len (fastserve.bench.length_predictor --trace)")
    parser.add_argument("out")
    parser.add_argument("--tokenizer", default="sharegpt-bpe")
    parser.add_argument("--pairs", default="first", choices=["first", "human"])
    args = parser.parse_args(argv)
    data = load(args.tokenizer, args.pairs)
    train_true = np.sort(data["outputs"][~data["test"]])
    with open(args.trace) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    pred = np.array([r["predicted_len"] for r in rows], dtype=float)
    ranks = (np.argsort(np.argsort(pred, kind="stable"), kind="stable") + 0.5) / len(pred)
    mapped = np.quantile(train_true, ranks)
    with open(args.out, "w") as f:
        for r, p in zip(rows, mapped, strict=True):
            f.write(json.dumps({**r, "predicted_len": max(1, round(float(p)))}) + "\n")
    print(f"{len(rows)} rows: log-std of predictions {np.log(pred).std():.2f} -> {np.log(mapped).std():.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
