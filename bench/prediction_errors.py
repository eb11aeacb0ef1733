"""How a predictor errs, beside a noisy oracle of about the same Kendall tau (docs/why-mlfq.md, 8.3).

    python -m fastserve.bench.prediction_errors docs/results/sharegpt_real_test_predicted.jsonl --noise 1.5

For a JSONL trace with predicted_len (bench/length_predictor.py --trace) and for the same
requests with true length x exp(N(0, --noise)) instead: tau, the spread of the predictions
(log-std, P95) against the truth's, the median predicted / true per true-length class (a
regression towards the mean shows as > 1 for short and < 1 for long answers), the mean |log
error| per prompt-length bin, and the share of short jobs predicted long and long predicted short.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from fastserve.bench.length_predictor import kendall_tau

OUTPUT_CLASSES = ((0, 64), (64, 256), (256, 1 << 20))
PROMPT_BINS = ((0, 16), (16, 64), (64, 256), (256, 1 << 20))


def describe(prompt: np.ndarray, true: np.ndarray, pred: np.ndarray) -> dict:
    err = np.abs(np.log(true / pred))
    return {
        "tau": kendall_tau(pred, true),
        "log_std_predicted": float(np.log(pred).std()),
        "log_std_true": float(np.log(true).std()),
        "p95_predicted": float(np.percentile(pred, 95)),
        "p95_true": float(np.percentile(true, 95)),
        "median_predicted_over_true": {
            f"{lo}-{hi - 1}": float(np.median(pred[m] / true[m]))
            for lo, hi in OUTPUT_CLASSES
            if (m := (true >= lo) & (true < hi)).any()
        },
        "mean_abs_log_error_by_prompt": {
            f"{lo}-{hi - 1}": float(err[m].mean())
            for lo, hi in PROMPT_BINS
            if (m := (prompt >= lo) & (prompt < hi)).any()
        },
        "short_predicted_long": float(np.mean((true < 128) & (pred >= 256))),
        "long_predicted_short": float(np.mean((true >= 256) & (pred < 128))),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastserve.bench.prediction_errors", description=__doc__)
    parser.add_argument("trace", help="JSONL with input_len, output_len, predicted_len")
    parser.add_argument("--noise", type=float, default=1.5, help="sigma of the noisy oracle beside it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    with open(args.trace) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    prompt = np.array([r["input_len"] for r in rows])
    true = np.array([r["output_len"] for r in rows], dtype=float)
    pred = np.array([r["predicted_len"] for r in rows], dtype=float)
    noisy = np.maximum(
        1, np.round(true * np.exp(np.random.default_rng(args.seed).normal(0, args.noise, len(true))))
    )
    result = {
        "predictor": describe(prompt, true, pred),
        f"noisy_oracle_sigma_{args.noise:g}": describe(prompt, true, noisy),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
