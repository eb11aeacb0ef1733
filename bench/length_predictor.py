"""Train and evaluate the output-length predictor on real ShareGPT, split by conversation.

    python -m fastserve.bench.length_predictor --json docs/results/length_predictor.json

ShareGPT V3 splits long conversations into chunks whose ids share a stem (`abc_0`, `abc_1`):
the split hashes that stem, so every chunk of a conversation lands on the same side and no
test prompt has a sibling in training. The model (services/scheduler/length_predictor.py:
hashed 1-3-grams of the prompt's token ids + length bins, ridge regression on log output
length) is fit on the train half; lambda and the error spread sigma are chosen on a
validation tenth of it (again by conversation); the test half is only scored.

Reported on the test half: Kendall tau-b between predicted and true length overall and
within random batches of 64 (mean and 95 % interval over batches: a scheduler only ever
ranks the jobs waiting at once), the same for the prompt length alone (skip-join's premise),
bucket accuracy, cost per prediction, model size. `--pairs first` is the FastServe artifact's
filter (the first two turns, whoever spoke); `--pairs human` takes the first human turn that
an assistant answered. Also written: the model (`--model`), and the test half's lengths with
predictions as a JSONL trace (`--trace`, replayed by `fastserve simulate --workload`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
import zlib
from collections.abc import Iterator

import numpy as np

from fastserve.bench.sharegpt import (
    DEFAULT_TOKENIZER,
    cache_dir,
    iter_records,
    keep,
    open_sharegpt,
    sharegpt_bpe,
)
from fastserve.services.scheduler.length_predictor import LengthPredictor, features, width

BUCKETS = (64, 128, 256, 512)  # output-length classes: <64, 64-127, 128-255, 256-511, 512+
LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0)


def conversation_key(record_id: str) -> str:
    """The conversation a ShareGPT record belongs to: its id without the `_N` chunk suffix."""
    stem, sep, suffix = record_id.rpartition("_")
    return stem if sep and suffix.isdigit() else record_id


def is_test(record_id: str) -> bool:
    """The held-out half: by a hash of the conversation, so all its chunks fall on one side."""
    return zlib.crc32(conversation_key(record_id).encode()) % 2 == 1


def pairs(records: Iterator[dict], mode: str) -> Iterator[tuple[str, str, str]]:
    """(record id, prompt, output) per record: `first` = the first two turns whoever spoke (the
    artifact's filter); `human` = the first human turn an assistant answered."""
    for index, record in enumerate(records):
        rid = str(record.get("id") or f"#{index}")
        turns = record.get("conversations") or []
        if mode == "first":
            if len(turns) >= 2:
                yield rid, str(turns[0].get("value", "")), str(turns[1].get("value", ""))
            continue
        for a, b in zip(turns, turns[1:], strict=False):
            if a.get("from") in ("human", "user") and b.get("from") in ("gpt", "chatgpt", "assistant"):
                yield rid, str(a.get("value", "")), str(b.get("value", ""))
                break


def encoder(tokenizer: str, dataset: str = ""):
    """Token ids of a batch of texts, BOS first (id 2, OPT's) as bench/sharegpt.py counts them."""
    if tokenizer == DEFAULT_TOKENIZER:
        tok = sharegpt_bpe(dataset)
        return lambda texts: [[2, *e.ids] for e in tok.encode_batch(texts)]
    if tokenizer == "byte":  # the opt-tiny preset's ids: UTF-8 bytes after 4 specials
        return lambda texts: [[2, *(b + 4 for b in t.encode())] for t in texts]
    raise SystemExit(f"--tokenizer {tokenizer!r}: use {DEFAULT_TOKENIZER} or byte")


def load(tokenizer: str, mode: str, dataset: str = "") -> dict[str, np.ndarray]:
    """Every kept pair's prompt ids (flat + offsets), output length and side; cached per tokenizer and mode."""
    path = cache_dir() / f"sharegpt-ids-{tokenizer}-{mode}-{zlib.crc32(dataset.encode()):08x}.npz"
    if path.exists():
        with np.load(path) as f:
            return dict(f)
    encode = encoder(tokenizer, dataset)
    flat, offsets, outputs, test, keys = [], [0], [], [], []
    chunk: list[tuple[str, str, str]] = []

    def flush() -> None:
        prompt_ids = encode([p for _, p, _ in chunk])
        output_lens = [len(ids) for ids in encode([o for _, _, o in chunk])]
        for (rid, _, _), ids, out in zip(chunk, prompt_ids, output_lens, strict=True):
            if keep(len(ids), out):
                flat.extend(ids)
                offsets.append(len(flat))
                outputs.append(out)
                test.append(is_test(rid))
                keys.append(zlib.crc32(conversation_key(rid).encode()))
        chunk.clear()

    with open_sharegpt(dataset) as f:
        for item in pairs(iter_records(f), mode):
            chunk.append(item)
            if len(chunk) == 512:
                flush()
    flush()
    data = {
        "ids": np.asarray(flat, dtype=np.int32),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "outputs": np.asarray(outputs, dtype=np.int32),
        "test": np.asarray(test, dtype=bool),
        "conversation": np.asarray(keys, dtype=np.int64),
    }
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **data)
    os.replace(tmp, path)
    return data


def as_bytes(data: dict[str, np.ndarray], tokenizer: str, dataset: str = "") -> dict[str, np.ndarray]:
    """The same rows with each prompt as BOS + UTF-8 byte ids (decoded from its `tokenizer` ids)."""
    tok = sharegpt_bpe(dataset) if tokenizer == DEFAULT_TOKENIZER else None
    if tok is None:
        raise SystemExit("--prompt-bytes decodes sharegpt-bpe ids")
    flat, offsets = [], [0]
    for ids in prompts(data, np.arange(len(data["outputs"]))):
        flat.append(2)
        flat.extend(b + 4 for b in tok.decode(ids[1:].tolist()).encode())
        offsets.append(len(flat))
    return {**data, "ids": np.asarray(flat, dtype=np.int32), "offsets": np.asarray(offsets, dtype=np.int64)}


def prompts(data: dict[str, np.ndarray], rows: np.ndarray) -> list[np.ndarray]:
    ids, offsets = data["ids"], data["offsets"]
    return [ids[offsets[r] : offsets[r + 1]] for r in rows]


def design(prompt_ids: list[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The sparse design matrix as (row, column, value) triples."""
    rows, cols, vals = [], [], []
    for r, ids in enumerate(prompt_ids):
        c, v = features(ids, dim)
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(v)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


def ridge(x: tuple, n: int, m: int, y: np.ndarray, lam: float, iters: int = 300) -> np.ndarray:
    """argmin ||Xw - y||^2 + lam ||w||^2 by conjugate gradients on the normal equations (numpy only)."""
    rows, cols, vals = x

    def matvec(w: np.ndarray) -> np.ndarray:  # (X^T X + lam I) w
        xw = np.bincount(rows, weights=vals * w[cols], minlength=n)
        return np.bincount(cols, weights=vals * xw[rows], minlength=m) + lam * w

    b = np.bincount(cols, weights=vals * y[rows], minlength=m)
    w = np.zeros(m)
    r = b - matvec(w)
    p = r.copy()
    rs = r @ r
    for _ in range(iters):
        ap = matvec(p)
        step = rs / (p @ ap)
        w += step * p
        r -= step * ap
        rs_new = r @ r
        if math.sqrt(rs_new) < 1e-6 * math.sqrt(b @ b):
            break
        p = r + (rs_new / rs) * p
        rs = rs_new
    return w


def predict_log(x: tuple, n: int, w: np.ndarray) -> np.ndarray:
    rows, cols, vals = x
    return np.bincount(rows, weights=vals * w[cols], minlength=n)


def kendall_tau(a: np.ndarray, b: np.ndarray, chunk: int = 512) -> float:
    """Kendall's tau-b (ties in either variable count as neither concordant nor discordant)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    s = pa = pb = 0.0
    for start in range(0, len(a), chunk):
        da = np.sign(a[start : start + chunk, None] - a[None, :])
        db = np.sign(b[start : start + chunk, None] - b[None, :])
        s += float((da * db).sum())
        pa += float(np.abs(da).sum())
        pb += float(np.abs(db).sum())
    return s / math.sqrt(pa * pb) if pa and pb else 0.0


def batch_taus(pred: np.ndarray, true: np.ndarray, size: int, count: int, seed: int) -> np.ndarray:
    """Tau-b within `count` random batches of `size` requests."""
    rng = np.random.default_rng(seed)
    return np.array(
        [
            kendall_tau(pred[i], true[i])
            for i in (rng.choice(len(true), size, replace=False) for _ in range(count))
        ]
    )


def interval(values: np.ndarray) -> dict[str, float]:
    """Mean and its 95 % normal interval."""
    m = float(np.mean(values))
    half = 1.96 * float(np.std(values, ddof=1)) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(values)}


def bucket(lengths: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.asarray(BUCKETS), lengths, side="right")


def evaluate(pred: np.ndarray, true: np.ndarray, prompt_len: np.ndarray, seed: int) -> dict:
    bp, bt = bucket(pred), bucket(true)
    log_err = np.log(true) - np.log(pred)
    return {
        "tau": kendall_tau(pred, true),
        "tau_batch64": interval(batch_taus(pred, true, 64, 1000, seed)),
        "tau_prompt_len": kendall_tau(prompt_len, true),
        "tau_prompt_len_batch64": interval(batch_taus(prompt_len, true, 64, 1000, seed)),
        "bucket_accuracy": float(np.mean(bp == bt)),
        "bucket_within_one": float(np.mean(np.abs(bp - bt) <= 1)),
        "bucket_majority_baseline": float(np.max(np.bincount(bt)) / len(bt)),
        "log_error_std": float(np.std(log_err)),
        "median_abs_ratio_error": float(np.exp(np.median(np.abs(log_err)))),
        "short_predicted_long": float(np.mean((true < BUCKETS[1]) & (pred >= BUCKETS[3]))),
        "long_predicted_short": float(np.mean((true >= BUCKETS[3]) & (pred < BUCKETS[1]))),
    }


def split_rows(data: dict[str, np.ndarray], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fit, validation, test) rows; validation is a tenth of the train half's conversations."""
    test = np.flatnonzero(data["test"])
    train = np.flatnonzero(~data["test"])
    val_mask = (data["conversation"][train] * 2654435761 + seed) % 10 == 0
    return train[~val_mask], train[val_mask], test


def train(
    data: dict[str, np.ndarray],
    dim: int,
    tokenizer: str,
    seed: int,
    lambdas: tuple[float, ...] = LAMBDAS,
    iters: int = 300,
) -> tuple[LengthPredictor, dict]:
    fit, val, _ = split_rows(data, seed)
    m = width(dim)
    y = np.log(data["outputs"].astype(float))
    xf, xv = design(prompts(data, fit), dim), design(prompts(data, val), dim)
    yf, yv = y[fit], y[val]
    center = float(yf.mean())
    scores = {}
    for lam in lambdas:
        w = ridge(xf, len(fit), m, yf - center, lam, iters)
        pv = predict_log(xv, len(val), w) + center
        scores[lam] = kendall_tau(pv, yv)
    best = max(scores, key=scores.get)
    w = ridge(xf, len(fit), m, yf - center, best, iters)
    w[m - 1] += center  # the bias column carries the mean
    sigma = float(np.std(yv - predict_log(xv, len(val), w)))
    # refit on the whole train half with the chosen lambda (sigma stays the validation estimate)
    rows = np.concatenate([fit, val])
    w = ridge(design(prompts(data, rows), dim), len(rows), m, y[rows] - center, best, iters)
    w[m - 1] += center
    return LengthPredictor(w.astype(np.float32), dim, sigma, tokenizer), {
        "lambda": best,
        "validation_tau": scores,
        "fit_rows": len(fit),
        "validation_rows": len(val),
    }


def cost_per_request(model: LengthPredictor, prompt_ids: list[np.ndarray]) -> dict[str, float]:
    """Wall time of model.predict over the given prompts, microseconds."""
    times = []
    for ids in prompt_ids:
        ids_list = ids.tolist()  # what the scheduler holds: a list of ints
        t0 = time.perf_counter()
        model.predict(ids_list)
        times.append((time.perf_counter() - t0) * 1e6)
    t = np.sort(np.array(times))
    return {
        "mean_us": float(t.mean()),
        "p50_us": float(t[len(t) // 2]),
        "p99_us": float(t[int(0.99 * len(t))]),
    }


def role_counts(dataset: str = "") -> dict:
    """Who speaks the first turn of each conversation with two turns; and among the pairs with a
    prompt of >= 1 000 characters and an answer under 250 (about >= 256 and < 64 tokens)."""
    first: dict[str, int] = {}
    long_short: dict[str, int] = {}
    with open_sharegpt(dataset) as f:
        for record in iter_records(f):
            turns = record.get("conversations") or []
            if len(turns) < 2:
                continue
            role = str(turns[0].get("from"))
            first[role] = first.get(role, 0) + 1
            if len(str(turns[0].get("value", ""))) >= 1000 and len(str(turns[1].get("value", ""))) < 250:
                long_short[role] = long_short.get(role, 0) + 1
    return {"first_turn": first, "long_prompt_short_answer_first_turn": long_short}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.length_predictor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="sharegpt-bpe | byte")
    parser.add_argument("--pairs", default="first", choices=["first", "human"])
    parser.add_argument("--dataset", default="", help="the ShareGPT JSON (default: the package's)")
    parser.add_argument("--dim", type=int, default=1 << 18, help="hashed feature buckets")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="", help="write the model (.npz) here")
    parser.add_argument("--trace", default="", help="write the test half as JSONL (lengths + prediction)")
    parser.add_argument("--json", default="", help="write the evaluation here")
    parser.add_argument("--plot", default="", help="predicted vs true length (PNG)")
    parser.add_argument(
        "--prompt-bytes",
        action="store_true",
        help="read prompts as UTF-8 byte ids (the opt-tiny preset's tokenizer) on the rows, split and "
        "output lengths of --tokenizer: a model for the byte-level live stack",
    )
    parser.add_argument(
        "--live-trace",
        default="",
        help="write --live-requests test-half requests (shuffled by --seed) as JSONL with their prompt_ids, "
        "clipped to --max-input-len / --max-output-len, for fastserve.bench.live_compare",
    )
    parser.add_argument("--live-requests", type=int, default=96)
    parser.add_argument(
        "--lambdas", default=",".join(f"{x:g}" for x in LAMBDAS), help="ridge strengths to choose from"
    )
    parser.add_argument("--cg-iters", type=int, default=300, help="conjugate-gradient iterations per fit")
    parser.add_argument("--max-input-len", type=int, default=512)
    parser.add_argument("--max-output-len", type=int, default=256)
    parser.add_argument(
        "--roles",
        action="store_true",
        help="only count who opens each conversation, overall and among long-prompt short-answer pairs",
    )
    args = parser.parse_args(argv)
    if args.roles:
        print(json.dumps(role_counts(args.dataset), indent=1))
        return 0

    t0 = time.perf_counter()
    data = load(args.tokenizer, args.pairs, args.dataset)
    if args.prompt_bytes:
        data = as_bytes(data, args.tokenizer, args.dataset)
        args.tokenizer = "byte"
    lengths = np.diff(data["offsets"])
    print(
        f"{len(lengths)} pairs ({args.pairs}), {int(data['test'].sum())} test; "
        f"{len(set(data['conversation'].tolist()))} conversations; loaded in {time.perf_counter() - t0:.1f}s"
    )
    t0 = time.perf_counter()
    lambdas = tuple(float(x) for x in args.lambdas.split(","))
    model, fit_info = train(data, args.dim, args.tokenizer, args.seed, lambdas, args.cg_iters)
    train_s = time.perf_counter() - t0
    _, _, test = split_rows(data, args.seed)
    test_prompts = prompts(data, test)
    pred = np.array([model.predict(ids) for ids in test_prompts])
    true = data["outputs"][test]
    result = {
        "tokenizer": args.tokenizer,
        "pairs": args.pairs,
        "dim": args.dim,
        "sigma": model.sigma,
        "train_seconds": train_s,
        **fit_info,
        "test_rows": len(test),
        "test_conversations": len(set(data["conversation"][test].tolist())),
        "shared_conversations": len(
            set(data["conversation"][test].tolist()) & set(data["conversation"][~data["test"]].tolist())
        ),
        "constant_prediction_log_error_std": float(np.std(np.log(true))),
        **evaluate(pred, true, lengths[test], args.seed),
        "cost": cost_per_request(model, random.Random(args.seed).sample(test_prompts, 2000)),
        "nonzero_weights": int(np.count_nonzero(model.weights)),
    }
    if args.model:
        model.save(args.model)
        result["model_bytes"] = os.path.getsize(args.model)
    for key in ("tau", "tau_prompt_len", "bucket_accuracy", "bucket_within_one", "sigma"):
        print(f"{key}: {result[key]:.3f}")
    for key in ("tau_batch64", "tau_prompt_len_batch64"):
        v = result[key]
        print(f"{key}: {v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]")
    print(f"cost: {result['cost']}; model bytes {result.get('model_bytes')}; lambda {result['lambda']}")
    if args.trace:
        with open(args.trace, "w") as f:
            for r, p in zip(test, pred, strict=True):
                row = {
                    "input_len": int(lengths[r]),
                    "output_len": int(data["outputs"][r]),
                    "predicted_len": int(p),
                }
                f.write(json.dumps(row) + "\n")
    if args.live_trace:
        rows = random.Random(args.seed).sample(list(test), args.live_requests)
        with open(args.live_trace, "w") as f:
            for r in rows:
                ids = data["ids"][data["offsets"][r] : data["offsets"][r + 1]][: args.max_input_len]
                row = {
                    "input_len": len(ids),
                    "output_len": int(min(data["outputs"][r], args.max_output_len)),
                    "predicted_len": model.predict(
                        ids
                    ),  # what the scheduler predicts from the clipped prompt
                    "prompt_ids": ids.tolist(),
                }
                f.write(json.dumps(row) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4.5))
        ax.hexbin(true, pred, xscale="log", yscale="log", gridsize=40, bins="log", mincnt=1)
        ax.plot([1, 2048], [1, 2048], "k--", lw=0.8)
        ax.set_xlabel("true output tokens")
        ax.set_ylabel("predicted")
        ax.set_title(f"{args.pairs} pairs, test half: tau {result['tau']:.2f}")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
