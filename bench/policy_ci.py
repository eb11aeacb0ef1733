"""Policy comparisons over seeds, with 95 % intervals: `run` a grid, `report` what it gave.

    python -m fastserve.bench.policy_ci run --out docs/results/ci_real.jsonl --workload sharegpt-real-test \\
        --policies fcfs,skip-join-mlfq,srpt-oracle,predicted-srpt --rates 3,5 --seeds 0,1,2,3,4
    python -m fastserve.bench.policy_ci report docs/results/ci_real.jsonl --json docs/results/ci_real.json \\
        --plot docs/results/ci_real.png

`run` simulates every (policy, rate, seed, prediction noise) point in turn, one process (the
machine is shared), and appends one line per point to `--out`; points already there are
skipped, so an interrupted grid resumes. A seed draws the requests and their arrivals, so
every policy at one (rate, seed) sees the same trace: differences are paired. A policy is
`name[/swap policy][@max batch size]`, e.g. `vllm@256` or `skip-join-mlfq/recompute`.
The simulator's flags (`--cost-model`, `--num-gpu-blocks`, ...) pass through; `--tag` names
the setting in the output.

`report` groups points by (tag, workload, noise, policy, rate) and gives, over seeds, the
mean and 95 % t-interval of latency per output token (mean, P95, P99), JCT, preemptions,
swap traffic; throughput at the SLO per seed (from that seed's rate sweep) with its
interval; and, per seed, the fraction of the skip-join -> srpt-oracle gap each policy closes
((skip - policy) / (skip - oracle), paired), with its interval.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys

from fastserve.bench.report import slo_crossing
from fastserve.bench.simulator import SimConfig, parse_args, requests_at, run_point
from fastserve.bench.workloads import load_trace, noisy_predictions
from fastserve.services.scheduler.policy import (
    BatchLimits,
    CostModel,
    PolicyConfig,
    needs_prediction,
    swap_policy_of,
)
from fastserve.services.scheduler.policy.predicted import DEFAULT_SIGMA

METRICS = ("lat_mean", "lat_p95", "lat_p99", "jct_mean", "ttft_mean", "preemptions", "swap_gb", "recomputes")
T975 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26}  # by df


def parse_policy(label: str) -> tuple[str, str | None, int | None]:
    """'vllm@256' -> ('vllm', None, 256); 'skip-join-mlfq/recompute' -> (.., 'recompute', None)."""
    name, _, batch = label.partition("@")
    name, _, swap = name.partition("/")
    return name, swap or None, int(batch) if batch else None


def kendall_tau(pred: list[int], true: list[int]) -> float:
    """Tau-b between predicted and true lengths (O(n^2), a few hundred requests)."""
    s = pa = pb = 0
    for i in range(len(true)):
        for j in range(i + 1, len(true)):
            da = (pred[i] > pred[j]) - (pred[i] < pred[j])
            db = (true[i] > true[j]) - (true[i] < true[j])
            s += da * db
            pa += da != 0
            pb += db != 0
    return s / math.sqrt(pa * pb) if pa and pb else 0.0


def point(args: argparse.Namespace, label: str, rate: float, seed: int, noise: float) -> dict:
    name, swap, batch = parse_policy(label)
    n = requests_at(rate, args.num_requests, args.duration)
    trace = load_trace(args.workload, n, rate, args.cv, seed, args.tokenizer, args.dataset)
    if noise >= 0:
        trace = noisy_predictions(trace, noise, seed)
    if needs_prediction(name) and any(len(r) < 4 for r in trace):
        raise SystemExit(f"{label}: --workload {args.workload} has no predictions; give --noise")
    sigma = args.prediction_sigma if args.prediction_sigma >= 0 else (noise if noise >= 0 else DEFAULT_SIGMA)
    config = SimConfig(
        policy=name,
        limits=BatchLimits(batch or args.max_batch_size, args.max_num_batched_tokens),
        num_gpu_blocks=args.num_gpu_blocks,
        num_host_blocks=args.num_host_blocks,
        kv_bytes_per_token=args.kv_bytes_per_token,
        host_bandwidth=args.host_bandwidth,
        swap_policy=swap_policy_of(name, swap or args.swap_policy[0]),
        pp=args.pp,
        policy_config=PolicyConfig(
            starvation_threshold=args.starvation_threshold, extra={"prediction_sigma": sigma}
        ),
    )
    records: list[dict] = []
    p = run_point(trace, config, CostModel.resolve(args.cost_model), args.slo, records=records)
    sim, lat = p["sim"], p["latency_per_token"]
    moved = sim["swap_out_blocks"] + sim["swap_in_blocks"] + sim["prefetch_blocks"]
    has_pred = all(len(r) == 4 for r in trace)
    return {
        "tag": args.tag,
        "workload": args.workload,
        "noise": noise,
        "policy": label,
        "rate": rate,
        "seed": seed,
        "requests": n,
        "unfinished": p["unfinished"],
        "lat_mean": lat["mean"],
        "lat_p95": lat["p95"],
        "lat_p99": lat["p99"],
        "jct_mean": p["jct"]["mean"],
        "ttft_mean": p["ttft"]["mean"],
        "preemptions": p["preemptions"],
        "swap_gb": moved * args.block_size * args.kv_bytes_per_token / 1e9,
        "recomputes": sim["recomputes"],
        "makespan": sim["makespan"],
        "tau": kendall_tau([r[3] for r in trace], [r[2] for r in trace]) if has_pred else None,
        **classes(sorted(trace), records),
    }


# who a predictor helps or hurts: mean latency per token of the requests in each class (true output
# tokens, and the trace's prediction where it has one), paired with the same requests under skip-join
CLASSES = {
    "short": lambda out, pred: out < 64,
    "long": lambda out, pred: out >= 512,
    "short_predicted_long": lambda out, pred: pred is not None and out < 128 and pred >= 256,
    "long_predicted_short": lambda out, pred: pred is not None and out >= 256 and pred < 128,
}


def classes(trace: list[tuple], records: list[dict]) -> dict:
    """`records` are the simulator's, in the order of the sorted trace."""
    out: dict = {}
    if len(records) != len(trace):
        return out
    for name, member in CLASSES.items():
        lats = [
            (r["finish"] - r["arrival"]) / max(r["output_tokens"], 1)
            for row, r in zip(trace, records, strict=True)
            if member(row[2], row[3] if len(row) > 3 else None)
        ]
        out[f"lat_{name}"] = statistics.fmean(lats) if lats else None
        out[f"n_{name}"] = len(lats)
    return out


def key_of(p: dict) -> tuple:
    return (p["tag"], p["workload"], p["noise"], p["policy"], p["rate"], p["seed"])


def run(argv: list[str]) -> int:
    own = argparse.ArgumentParser(add_help=False)
    own.add_argument("--out", required=True)
    own.add_argument("--policies", required=True)
    own.add_argument("--rates", required=True)
    own.add_argument("--seeds", default="0,1,2,3,4")
    own.add_argument(
        "--noise", default="-1", help="comma list of --prediction-noise values (-1: the trace's)"
    )
    own.add_argument("--tag", default="")
    mine, rest = own.parse_known_args(argv)
    args = parse_args(rest)
    args.tag = mine.tag
    done = set()
    if os.path.exists(mine.out):
        with open(mine.out) as f:
            done = {key_of(json.loads(line)) for line in f if line.strip()}
    grid = [
        (label, float(rate), int(seed), float(noise))
        for noise in mine.noise.split(",")
        for rate in mine.rates.split(",")
        for seed in mine.seeds.split(",")
        for label in mine.policies.split(",")
    ]
    for label, rate, seed, noise in grid:
        if (args.tag, args.workload, noise, label, rate, seed) in done:
            continue
        p = point(args, label, rate, seed, noise)
        with open(mine.out, "a") as f:
            f.write(json.dumps(p) + "\n")
        print(
            f"{args.tag or '-'} {args.workload} noise {noise:g} {label} rate {rate:g} seed {seed}: "
            f"lat {p['lat_mean']:.4f} p99 {p['lat_p99']:.3f} jct {p['jct_mean']:.1f} tau {p['tau']}",
            flush=True,
        )
    return 0


def interval(values: list[float]) -> dict:
    """Mean and 95 % t-interval over seeds."""
    n = len(values)
    m = statistics.fmean(values)
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def aggregate(
    points: list[dict], slo: float = 0.3, base: str = "skip-join-mlfq", oracle: str = "srpt-oracle"
) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for p in points:
        groups.setdefault((p["tag"], p["workload"], p["noise"], p["policy"], p["rate"]), []).append(p)
    index = {key_of(p): p for p in points}
    rows = []
    for (tag, workload, noise, policy, rate), ps in sorted(groups.items(), key=lambda kv: str(kv[0])):
        row: dict = {"tag": tag, "workload": workload, "noise": noise, "policy": policy, "rate": rate}
        for m in METRICS:
            row[m] = interval([p[m] for p in ps])
        for name in CLASSES:
            values = [p[f"lat_{name}"] for p in ps if p.get(f"lat_{name}") is not None]
            row[f"lat_{name}"] = interval(values) if values else None
            row[f"n_{name}"] = sum(p.get(f"n_{name}", 0) for p in ps)
        taus = [p["tau"] for p in ps if p["tau"] is not None]
        row["tau"] = interval(taus) if taus else None
        row["unfinished"] = sum(p["unfinished"] for p in ps)
        for m in ("lat_mean", "lat_p95", "lat_p99", "jct_mean"):
            gaps = []
            for p in ps:
                b = index.get((tag, workload, -1.0, base, rate, p["seed"])) or index.get(
                    (tag, workload, noise, base, rate, p["seed"])
                )
                o = index.get((tag, workload, -1.0, oracle, rate, p["seed"])) or index.get(
                    (tag, workload, noise, oracle, rate, p["seed"])
                )
                if b and o and b[m] != o[m]:
                    gaps.append((b[m] - p[m]) / (b[m] - o[m]))
            row[f"gap_closed_{m}"] = interval(gaps) if gaps else None
        rows.append(row)
    # throughput at the SLO: per seed, over that seed's rates; then its interval over seeds
    sweeps: dict[tuple, dict[int, list[tuple[float, float, float]]]] = {}
    for p in points:
        k = (p["tag"], p["workload"], p["noise"], p["policy"])
        sweeps.setdefault(k, {}).setdefault(p["seed"], []).append((p["rate"], p["lat_mean"], p["lat_p95"]))
    tput = {}
    for k, seeds in sweeps.items():
        entry = {}
        for stat, col in (("mean", 1), ("p95", 2)):
            crossings = [slo_crossing([(r[0], r[col]) for r in sorted(v)], slo) for v in seeds.values()]
            rates = [c for c, _ in crossings if c is not None]
            entry[stat] = {
                "crossed": len(rates),
                "seeds": len(crossings),
                "never_crossed": sum(s == "never_crossed" for _, s in crossings),
                **(interval(rates) if rates else {}),
            }
        entry["max_rate"] = max(r[0] for v in seeds.values() for r in v)
        entry["rates"] = sorted({r[0] for v in seeds.values() for r in v})
        tput[k] = entry
    for row in rows:
        row["throughput_at_slo"] = tput[(row["tag"], row["workload"], row["noise"], row["policy"])]
    return rows


def fmt(ci: dict | None, digits: int = 3) -> str:
    if not ci:
        return "-"
    if ci["n"] < 2 or math.isnan(ci["lo"]):
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


def fmt_tput(entry: dict, max_rate: float) -> str:
    if entry["crossed"] == entry["seeds"]:
        return fmt(entry, 2)
    if entry["never_crossed"] == entry["seeds"]:
        return f">{max_rate:g}"
    return f"{entry['crossed']}/{entry['seeds']} crossed" + (
        f" ({entry['mean']:.2f})" if entry["crossed"] else ""
    )


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| setting | policy | rate | lat/tok mean s | P95 | P99 | JCT s | preempt | swap GB | gap closed: mean lat | "
        "P99 | JCT | τ |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        setting = (
            r["workload"]
            + (f" {r['tag']}" if r["tag"] else "")
            + (f" σ={r['noise']:g}" if r["noise"] >= 0 else "")
        )
        lines.append(
            f"| {setting} | {r['policy']} | {r['rate']:g} | {fmt(r['lat_mean'], 4)} | {fmt(r['lat_p95'])} | "
            f"{fmt(r['lat_p99'])} | {fmt(r['jct_mean'], 1)} | {fmt(r['preemptions'], 0)} | {fmt(r['swap_gb'], 0)} | "
            f"{fmt(r['gap_closed_lat_mean'], 2)} | {fmt(r['gap_closed_lat_p99'], 2)} | "
            f"{fmt(r['gap_closed_jct_mean'], 2)} | {fmt(r['tau'], 2) if r['tau'] else '-'} |"
        )
    return lines


def class_table(rows: list[dict]) -> list[str]:
    """Mean latency per token of the requests in each class (CLASSES), over seeds."""
    lines = [
        "| setting | policy | rate | " + " | ".join(f"{c} (n)" for c in CLASSES) + " |",
        "|---|---|---:|" + "---:|" * len(CLASSES),
    ]
    for r in rows:
        if r.get("lat_short") is None:
            continue
        cells = " | ".join(f"{fmt(r[f'lat_{c}'])} ({r[f'n_{c}']})" for c in CLASSES)
        lines.append(f"| {r['workload']} {r['tag']} | {r['policy']} | {r['rate']:g} | {cells} |")
    return lines


def tput_table(rows: list[dict]) -> list[str]:
    seen, lines = (
        set(),
        ["| setting | policy | rates | tput@SLO mean | tput@SLO P95 |", "|---|---|---|---:|---:|"],
    )
    for r in rows:
        k = (r["tag"], r["workload"], r["noise"], r["policy"])
        t = r["throughput_at_slo"]
        if k in seen or len(t["rates"]) < 2:
            continue
        seen.add(k)
        setting = (
            r["workload"]
            + (f" {r['tag']}" if r["tag"] else "")
            + (f" σ={r['noise']:g}" if r["noise"] >= 0 else "")
        )
        lines.append(
            f"| {setting} | {r['policy']} | {','.join(f'{x:g}' for x in t['rates'])} | "
            f"{fmt_tput(t['mean'], t['max_rate'])} | {fmt_tput(t['p95'], t['max_rate'])} |"
        )
    return lines


def thresholds(rows: list[dict]) -> list[dict]:
    """Noisy-oracle sweeps: per (workload, policy, rate) and metric, the tau at which the policy's
    gap closed crosses 0 (it beats skip-join above it), interpolated between noise levels."""
    sweeps: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["noise"] >= 0 and r["tau"] and r["policy"] not in ("skip-join-mlfq", "srpt-oracle"):
            sweeps.setdefault((r["tag"], r["workload"], r["policy"], r["rate"]), []).append(r)
    out = []
    for (tag, workload, policy, rate), rs in sweeps.items():
        rs.sort(key=lambda r: r["tau"]["mean"])
        entry = {"tag": tag, "workload": workload, "policy": policy, "rate": rate}
        for m in ("lat_mean", "lat_p95", "lat_p99", "jct_mean"):
            pts = [(r["tau"]["mean"], r[f"gap_closed_{m}"]["mean"]) for r in rs if r[f"gap_closed_{m}"]]
            crossing = None
            if pts and pts[0][1] >= 0:
                crossing = f"<{pts[0][0]:.2f}"  # beats skip-join at every noise tried
            for (t0, g0), (t1, g1) in zip(pts, pts[1:], strict=False):
                if g0 < 0 <= g1:
                    crossing = f"{t0 + (0 - g0) * (t1 - t0) / (g1 - g0):.2f}"
            if crossing is None and pts:
                crossing = f">{pts[-1][0]:.2f}"  # never beats it
            entry[m] = crossing
            entry[f"{m}_curve"] = pts
        out.append(entry)
    return out


def threshold_table(entries: list[dict]) -> list[str]:
    lines = [
        "| setting | policy | rate | τ to beat skip-join: mean lat | P95 | P99 | JCT |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['workload']} {e['tag']} | {e['policy']} | {e['rate']:g} | {e['lat_mean']} | {e['lat_p95']} | "
            f"{e['lat_p99']} | {e['jct_mean']} |"
        )
    return lines


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["tag"], r["workload"], r["noise"], r["rate"]) for r in rows}, key=str)
    fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 4), squeeze=False)
    for ax, s in zip(axes[0], settings, strict=True):
        rs = [r for r in rows if (r["tag"], r["workload"], r["noise"], r["rate"]) == s]
        y = range(len(rs))
        means = [r["lat_mean"]["mean"] for r in rs]
        err = [
            [r["lat_mean"]["mean"] - r["lat_mean"]["lo"] for r in rs],
            [r["lat_mean"]["hi"] - r["lat_mean"]["mean"] for r in rs],
        ]
        ax.barh(list(y), means, xerr=err, color="tab:blue", alpha=0.7)
        ax.set_yticks(list(y), [r["policy"] for r in rs], fontsize=7)
        ax.set_xlabel("mean latency per output token (s), 95% CI")
        ax.set_title(f"{s[1]} {s[0]} @{s[3]:g}" + (f" σ={s[2]:g}" if s[2] >= 0 else ""), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def tput_ratios(points: list[dict], a: str, b: str, slo: float = 0.3) -> list[dict]:
    """Throughput at the SLO of policy `a` over policy `b`, per seed (same tag, workload, noise),
    with its interval; seeds where either never crossed are left out (and counted)."""
    out = []
    settings = sorted({(p["tag"], p["workload"], p["noise"]) for p in points}, key=str)
    for tag, workload, noise in settings:
        entry: dict = {"tag": tag, "workload": workload, "noise": noise, "ratio": f"{a}/{b}"}
        for stat in ("lat_mean", "lat_p95"):
            ratios = []
            seeds = sorted(
                {p["seed"] for p in points if (p["tag"], p["workload"], p["noise"]) == (tag, workload, noise)}
            )
            for seed in seeds:
                cross = []
                for policy in (a, b):
                    sweep = [
                        (p["rate"], p[stat])
                        for p in points
                        if (p["tag"], p["workload"], p["noise"], p["policy"], p["seed"])
                        == (tag, workload, noise, policy, seed)
                    ]
                    cross.append(slo_crossing(sweep, slo)[0] if len(sweep) > 1 else None)
                if cross[0] and cross[1]:
                    ratios.append(cross[0] / cross[1])
            entry[stat] = interval(ratios) if ratios else None
            entry[f"{stat}_seeds"] = f"{len(ratios)}/{len(seeds)}"
        if entry["lat_mean"] or entry["lat_p95"]:
            out.append(entry)
    return out


def report(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastserve.bench.policy_ci report")
    parser.add_argument("points", nargs="+", help="JSONL files written by `run`")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    parser.add_argument("--slo", type=float, default=0.3)
    parser.add_argument(
        "--ratios", default="", help="comma list of A/B: throughput at the SLO of A over B, per seed"
    )
    args = parser.parse_args(argv)
    points = []
    for path in args.points:
        with open(path) as f:
            points += [json.loads(line) for line in f if line.strip()]
    rows = aggregate(points, args.slo)
    print("\n".join(table(rows)))
    print()
    print("\n".join(tput_table(rows)))
    print()
    print("\n".join(class_table(rows)))
    ratios = [
        e
        for pair in filter(None, args.ratios.split(","))
        for e in tput_ratios(points, *pair.split("/"), args.slo)
    ]
    for e in ratios:
        setting = (
            e["workload"]
            + (f" {e['tag']}" if e["tag"] else "")
            + (f" σ={e['noise']:g}" if e["noise"] >= 0 else "")
        )
        print(
            f"{setting}: {e['ratio']} throughput at the SLO, mean {fmt(e['lat_mean'], 2)} "
            f"({e['lat_mean_seeds']} seeds), P95 {fmt(e['lat_p95'], 2)} ({e['lat_p95_seeds']} seeds)"
        )
    limits = thresholds(rows)
    if limits:
        print()
        print("\n".join(threshold_table(limits)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "tau_thresholds": limits, "ratios": ratios}, f, indent=1)
    if args.plot:
        plot(rows, args.plot)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("run", "report"):
        print(__doc__)
        return 2
    return run(argv[1:]) if argv[0] == "run" else report(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
