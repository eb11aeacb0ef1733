"""Where proactive KV swapping leads recompute and reactive swapping most (docs/why-mlfq.md, section 9).

    python -m fastserve.bench.swap_study --out docs/results/swap_study.jsonl --json docs/results/swap_study.json \\
        --plot docs/results/swap_study.png

For each setting (model size and GPUs, GPU KV blocks: memory pressure, host link, workload) it
runs skip-join-mlfq under each swap policy (synthetic ShareGPT unless the setting says
summarize: long prompts) over a rate sweep and seeds
(fastserve.bench.policy_ci, one process; resumable), then reports per seed the throughput at the SLO
(mean latency per output token) of each swap policy and the ratios proactive / recompute and
proactive / reactive, with 95 % intervals over seeds, and the same ratios of mean latency per
token at one load.

Cost models follow opt-13b-a100 (services/scheduler/policy/cost_model.py): an iteration reads
the weights once at 80 % of HBM bandwidth, matmuls run at 50 % of the fp16 peak, attention reads
the KV; with tensor parallelism over g GPUs each GPU holds 1/g of the weights and of each token's
KV, and swaps its share over its own host link (all-reduce time is left out). GPU KV blocks:
(0.9 x GPU memory - weights / g) / (KV bytes per token per GPU x 16); host blocks: 32 GiB per GPU
(the artifact's --swap-space 32).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

from fastserve.bench.policy_ci import T975
from fastserve.bench.policy_ci import run as ci_run
from fastserve.bench.report import slo_crossing

GIB = 2**30
HBM = 0.8 * 1.555e12  # A100 bytes/s, as opt-13b-a100
FLOPS = 0.5 * 312e12
MODELS = {  # parameters, layers, hidden
    "13b": (13e9, 40, 5120),
    "66b": (66e9, 64, 9216),
    "175b": (175e9, 96, 12288),
}
SWAPS = ("proactive", "reactive", "recompute")


def setting(
    model: str, gpus: int, gpu_gib: float, memory: float = 1.0, link: float = 25e9, workload: str = "sharegpt"
) -> dict:
    """Simulator flags for `model` on `gpus` A100s of `gpu_gib`, keeping `memory` of the KV pool."""
    params, layers, hidden = MODELS[model]
    weights = 2 * params / gpus
    kv_token = 2 * layers * hidden * 2 // gpus
    blocks = int((0.9 * gpu_gib * GIB - weights) / (kv_token * 16) * memory)
    cost = f"c0={weights / HBM:.6g},c_prefill={2 * params / gpus / FLOPS:.6g},c_decode={2 * params / gpus / FLOPS:.6g},c_ctx={kv_token / HBM:.6g}"
    return {
        "--cost-model": cost,
        "--kv-bytes-per-token": str(kv_token),
        "--num-gpu-blocks": str(blocks),
        "--num-host-blocks": str(int(32 * GIB // (kv_token * 16))),
        "--host-bandwidth": f"{link:g}",
        "--workload": workload,
    }


SETTINGS = {
    "13b-1xa100-40g": setting("13b", 1, 40),
    "13b-half-kv": setting("13b", 1, 40, 0.5),
    "13b-quarter-kv": setting("13b", 1, 40, 0.25),
    "13b-quarter-kv-pcie5": setting("13b", 1, 40, 0.25, 50e9),
    "13b-pcie3": setting("13b", 1, 40, 1.0, 12.5e9),
    "13b-summarize": setting("13b", 1, 40, workload="summarize"),
    "13b-half-kv-summarize": setting("13b", 1, 40, 0.5, workload="summarize"),
    "175b-8xa100-80g": setting("175b", 8, 80),
    "175b-quarter-kv": setting("175b", 8, 80, 0.25),
}


def interval(values: list[float]) -> dict:
    n = len(values)
    m = statistics.fmean(values)
    half = T975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    return {"mean": m, "lo": m - half, "hi": m + half, "n": n}


def summarize(points: list[dict], slo: float, at_rate: float) -> list[dict]:
    by: dict[tuple, dict[str, dict[int, list]]] = {}
    for p in points:
        swap = p["policy"].partition("/")[2]
        by.setdefault(p["tag"], {}).setdefault(swap, {}).setdefault(p["seed"], []).append(p)
    rows = []
    for tag, swaps in by.items():
        tput: dict[str, dict[int, float | None]] = {}
        lat: dict[str, dict[int, float]] = {}
        for swap, seeds in swaps.items():
            tput[swap] = {
                s: slo_crossing([(p["rate"], p["lat_mean"]) for p in ps], slo)[0] for s, ps in seeds.items()
            }
            lat[swap] = {s: p["lat_mean"] for s, ps in seeds.items() for p in ps if p["rate"] == at_rate}
        row: dict = {"setting": tag, "flags": SETTINGS.get(tag), "at_rate": at_rate}
        for swap in SWAPS:
            values = [v for v in tput.get(swap, {}).values() if v is not None]
            row[f"tput_{swap}"] = interval(values) if values else None
            row[f"tput_{swap}_crossed"] = f"{len(values)}/{len(tput.get(swap, {}))}"
        for other in ("recompute", "reactive"):
            pro, oth = tput.get("proactive", {}), tput.get(other, {})
            ratios = [pro[s] / oth[s] for s in pro if pro[s] and oth.get(s)]
            row[f"tput_proactive_over_{other}"] = interval(ratios) if ratios else None
            lp, lo = lat.get("proactive", {}), lat.get(other, {})
            lr = [lo[s] / lp[s] for s in lp if s in lo]
            row[f"lat_{other}_over_proactive"] = interval(lr) if lr else None
        rows.append(row)
    return rows


def fmt(ci: dict | None) -> str:
    if not ci:
        return "-"
    return f"{ci['mean']:.2f}" + ("" if ci["n"] < 2 else f" [{ci['lo']:.2f}, {ci['hi']:.2f}]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastserve.bench.swap_study",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, help="JSONL of every run (resumable)")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--rates", default="1.5,2,3,4,6")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--at-rate", type=float, default=3.0, help="latency ratios at this load")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--plot", default="")
    args = parser.parse_args(argv)
    names = args.settings.split(",")
    if not args.report_only:
        for name in names:
            flags = [f"{flag}={value}" for flag, value in SETTINGS[name].items()]
            ci_run(
                [
                    "--out",
                    args.out,
                    "--tag",
                    name,
                    "--rates",
                    args.rates,
                    "--seeds",
                    args.seeds,
                    "--policies",
                    ",".join(f"skip-join-mlfq/{s}" for s in SWAPS),
                    "--num-requests",
                    "400",
                    "--duration",
                    "200",
                    *flags,
                ]
            )
    with open(args.out) as f:
        points = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in summarize(points, 0.3, args.at_rate) if r["setting"] in names]
    print(
        "| setting | GPU blocks | tput proactive | reactive | recompute | proactive/recompute | proactive/reactive | "
        f"lat recompute/proactive @{args.at_rate:g} | lat reactive/proactive |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['setting']} | {SETTINGS[r['setting']]['--num-gpu-blocks']} | {fmt(r['tput_proactive'])} | "
            f"{fmt(r['tput_reactive'])} | {fmt(r['tput_recompute'])} | {fmt(r['tput_proactive_over_recompute'])} | "
            f"{fmt(r['tput_proactive_over_reactive'])} | {fmt(r['lat_recompute_over_proactive'])} | "
            f"{fmt(r['lat_reactive_over_proactive'])} |"
        )
    print(f"\nAt {args.at_rate:g} req/s (means over seeds):")
    print("| setting | swap policy | lat/token s | JCT s | preemptions | swap GB | recomputes | makespan s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        for swap in SWAPS:
            ps = [
                p
                for p in points
                if p["tag"] == name and p["rate"] == args.at_rate and p["policy"].endswith(f"/{swap}")
            ]
            if ps:
                m = {
                    k: statistics.fmean(p[k] for p in ps)
                    for k in ("lat_mean", "jct_mean", "preemptions", "swap_gb", "recomputes", "makespan")
                }
                print(
                    f"| {name} | {swap} | {m['lat_mean']:.3f} | {m['jct_mean']:.0f} | {m['preemptions']:.0f} | "
                    f"{m['swap_gb']:.0f} | {m['recomputes']:.0f} | {m['makespan']:.0f} |"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 3.8))
        x = range(len(rows))
        for k, (other, color) in enumerate((("recompute", "tab:orange"), ("reactive", "tab:green"))):
            cis = [r[f"tput_proactive_over_{other}"] for r in rows]
            means = [c["mean"] if c else math.nan for c in cis]
            err = [
                [c["mean"] - c["lo"] if c and c["n"] > 1 else 0 for c in cis],
                [c["hi"] - c["mean"] if c and c["n"] > 1 else 0 for c in cis],
            ]
            ax.bar([i + 0.4 * k for i in x], means, 0.4, yerr=err, color=color, label=f"proactive / {other}")
        ax.axhline(2.7, color="tab:orange", ls="--", lw=0.8)
        ax.axhline(1.7, color="tab:green", ls="--", lw=0.8)
        ax.set_xticks([i + 0.2 for i in x], [r["setting"] for r in rows], fontsize=7, rotation=20)
        ax.set_ylabel("throughput at SLO ratio (95% CI)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
