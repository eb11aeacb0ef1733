"""Results of `python -m fastserve.bench.vs_vllm`: `vllm bench serve` files read into one shape, greedy
outputs compared, where vLLM starts to queue, tables and the plot. No server is started here."""

from __future__ import annotations

import math
import re

VLLM = "vLLM-CPU"
FASTSERVE = "FastServe"
QUEUE_FACTOR = 3.0  # a rate queues when its P99 TTFT is over this many times the lowest rate's


def parse_vllm_bench(data: dict) -> dict:
    """The numbers of one `vllm bench serve --save-result` file (times in ms, as it writes them)."""

    def metric(name: str, stat: str) -> float:
        value = data.get(f"{stat}_{name}_ms")
        return math.nan if value is None else float(value)

    out = {
        "num_prompts": data.get("num_prompts"),
        "completed": data["completed"],
        "failed": data.get("failed", data.get("num_prompts", data["completed"]) - data["completed"]),
        "max_concurrency": data.get("max_concurrency"),
        "request_rate": data.get("request_rate"),
        "duration_s": data["duration"],
        "total_input_tokens": data["total_input_tokens"],
        "total_output_tokens": data["total_output_tokens"],
        "request_throughput": data["request_throughput"],
        "output_throughput": data["output_throughput"],
    }
    for name in ("ttft", "tpot", "itl", "e2el"):
        out[name] = {stat: metric(name, stat) for stat in ("mean", "median", "p99")}
    return out


def compare_greedy(a: list[dict], b: list[dict], tolerance: float) -> dict:
    """Two servers' greedy completions of the same prompts, each {'tokens': [...], 'logprobs': [...]}.

    identical: every prompt produced the same tokens; max_logprob_diff: over the positions where
    both agree so far (after the first difference the contexts differ)."""
    worst = 0.0
    identical = len(a) == len(b)
    first_difference = []
    for x, y in zip(a, b, strict=False):
        same = 0
        for tx, ty in zip(x["tokens"], y["tokens"], strict=False):
            if tx != ty:
                break
            same += 1
        for lx, ly in zip(x["logprobs"][:same], y["logprobs"][:same], strict=True):
            worst = max(worst, abs(lx - ly))
        differs = same < max(len(x["tokens"]), len(y["tokens"]))
        identical = identical and not differs
        first_difference.append(same if differs else None)
    return {
        "identical_tokens": identical,
        "max_logprob_diff": worst,
        "tolerance": tolerance,
        "ok": identical and worst <= tolerance,
        "first_difference": first_difference,
    }


def queue_rate(results: list[dict], server: str = VLLM) -> float | None:
    """The lowest rate at which `server`'s P99 TTFT exceeds QUEUE_FACTOR x its lowest rate's."""
    runs = sorted((r for r in results if r["server"] == server), key=lambda r: r["rate"])
    if len(runs) < 2:
        return None
    base = runs[0]["ttft"]["p99"]
    return next((r["rate"] for r in runs[1:] if r["ttft"]["p99"] > QUEUE_FACTOR * base), None)


def trace_settings(argv: list[str]) -> list[str]:
    """`fastserve bench` flags without those that differ between the runs of one comparison."""
    out, skip = [], False
    for i, token in enumerate(argv):
        if skip:
            skip = False
        elif token in ("--rate", "--base-url", "--label", "--json") and i + 1 < len(argv):
            skip = True
        else:
            out.append(token)
    return out


def adopt_vllm_results(report: dict, previous: dict) -> list[float]:
    """Copies vLLM's results of an earlier run (`previous`, its vs_vllm.json) into `report`; returns
    the rates vLLM's trace ran at (the doubled ones included), for FastServe to run the same.

    vLLM does not change while FastServe does, so a rerun after a FastServe change serves only
    FastServe. The runs must share their trace settings."""
    runs = [r for r in previous["trace"] if r["server"] == VLLM]
    theirs = trace_settings(runs[0]["command"].split()[2:]) if runs else report["trace_settings"]
    if theirs != report["trace_settings"]:
        raise SystemExit(
            f"--vllm-results: that run's trace {theirs} is not this run's {report['trace_settings']}"
        )
    if VLLM in previous["greedy"]:
        report["greedy"][VLLM] = previous["greedy"][VLLM]
    report["trace_runs"] += [r for r in previous.get("trace_runs", previous["trace"]) if r["server"] == VLLM]
    report["trace"] = trace_means(report["trace_runs"])
    report["busy"] += [r for r in previous["busy"] if r["server"] == VLLM]
    for part in ("anchor", "step"):
        if VLLM in previous[part]:
            report[part][VLLM] = previous[part][VLLM]
    report["vllm_results_from"] = {"date": previous["date"], "command": previous["command"]}
    for key in ("start_seconds", "server_commands"):
        if VLLM in previous.get(key, {}):
            report.setdefault(key, {})[VLLM] = previous[key][VLLM]
    return sorted({r["rate"] for r in previous["trace"] if r["server"] == VLLM})


def trace_means(runs: list[dict]) -> list[dict]:
    """One result per (server, rate): the mean of that pair's runs field by field, `runs` their count.

    A percentile becomes the mean of the runs' percentiles (the issue's table: means of 2-3 runs)."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["server"], r["rate"]), []).append(r)
    return [{**_mean(group), "runs": len(group)} for group in groups.values()]


def _mean(values: list):
    first = values[0]
    if isinstance(first, dict):
        return {k: _mean([v[k] for v in values]) if all(k in v for v in values) else first[k] for k in first}
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if not numbers or all(v == first for v in values):
        return first
    return sum(values) / len(values)


def by_rate(results: list[dict]) -> dict[float, dict[str, dict]]:
    out: dict[float, dict[str, dict]] = {}
    for r in results:
        out.setdefault(r["rate"], {})[r["server"]] = r
    return dict(sorted(out.items()))


def ratios(results: list[dict], runs: list[dict] | None = None) -> list[dict]:
    """FastServe / vLLM per rate: throughput, mean TTFT, mean TPOT, P99 latency per output token;
    with every run (`runs`) and more than one per rate, also the mean TPOT's ratio run by run (the
    k-th run of one server against the k-th of the other), to show how far one run moves it."""
    rows = []
    for rate, pair in by_rate(results).items():
        if VLLM not in pair or FASTSERVE not in pair:
            continue
        fs, vl = pair[FASTSERVE], pair[VLLM]
        row = {
            "rate": rate,
            "throughput": fs["output_throughput"] / vl["output_throughput"],
            "ttft_mean": fs["ttft"]["mean"] / vl["ttft"]["mean"],
            "tpot_mean": fs["tpot"]["mean"] / vl["tpot"]["mean"],
            "latency_per_token_p99": fs["latency_per_token"]["p99"] / vl["latency_per_token"]["p99"],
        }
        ours, theirs = (
            [r for r in runs or () if (r["server"], r["rate"]) == (name, rate)] for name in (FASTSERVE, VLLM)
        )
        if min(len(ours), len(theirs)) > 1:
            row["tpot_mean_runs"] = [
                f["tpot"]["mean"] / v["tpot"]["mean"] for f, v in zip(ours, theirs, strict=False)
            ]
        rows.append(row)
    return rows


def busy_fall(quiet: list[dict], busy: list[dict]) -> list[dict]:
    """How much each server's output throughput fell with one core busy, at the busy run's rate:
    against the quiet run the busy part made just before (older files: the trace's run)."""
    rows = []
    for b in busy:
        quiet_tok_s = b.get("quiet_output_throughput")
        if quiet_tok_s is None:
            q = next((r for r in quiet if r["server"] == b["server"] and r["rate"] == b["rate"]), None)
            if q is None:
                continue
            quiet_tok_s = q["output_throughput"]
        rows.append(
            {
                "server": b["server"],
                "rate": b["rate"],
                "quiet_tok_s": quiet_tok_s,
                "busy_tok_s": b["output_throughput"],
                "fall": 1 - b["output_throughput"] / quiet_tok_s,
            }
        )
    return rows


def trace_table(results: list[dict]) -> str:
    lines = [
        "| rate | server | out tok/s | TTFT mean / P99 (ms) | TPOT mean (ms) | E2E mean (s) | latency/token P99 (ms) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for rate, pair in by_rate(results).items():
        for server in (VLLM, FASTSERVE):
            if server in pair:
                r = pair[server]
                lines.append(
                    f"| {rate:g} req/s | {server} | {r['output_throughput']:.1f} | "
                    f"{r['ttft']['mean'] * 1e3:.0f} / {r['ttft']['p99'] * 1e3:.0f} | "
                    f"{r['tpot']['mean'] * 1e3:.0f} | {r['jct']['mean']:.1f} | "
                    f"{r['latency_per_token']['p99'] * 1e3:.0f} |"
                )
    return "\n".join(lines)


DECODE_STEP_METRIC = "fastserve:worker_decode_step_seconds"
_METRICS_ADDRESS = re.compile(r"\bworker0 http://(\S+)/metrics")


def worker_metrics_address(log_text: str) -> str | None:
    """Rank 0's metrics address (host:port), from the line of `fastserve up`'s output that lists them."""
    match = _METRICS_ADDRESS.search(log_text)
    return match.group(1) if match else None


def decode_step(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, float]:
    """(mean ms, iterations) of the worker's decode-only steps between two scrapes of its /metrics."""
    steps = after.get(f"{DECODE_STEP_METRIC}_count", 0.0) - before.get(f"{DECODE_STEP_METRIC}_count", 0.0)
    seconds = after.get(f"{DECODE_STEP_METRIC}_sum", 0.0) - before.get(f"{DECODE_STEP_METRIC}_sum", 0.0)
    return (seconds / steps * 1e3 if steps else None), steps


def step_table(steps: dict[str, list[dict]]) -> str:
    """Per-iteration decode time per batch and context, both servers: the median TPOT over the N
    requests (robust to a client that reads several streamed tokens at once, which ITL is not), and
    FastServe's decode step as its worker timed it (model + sampling, the mean over the wave's
    decode-only iterations), held against vLLM's TPOT: the engine without the serving around it."""
    lines = [
        "| batch / ctx | vLLM TPOT median / ITL median (ms) | FastServe TPOT median / ITL median (ms) "
        "| FastServe / vLLM (TPOT) | FastServe worker step (ms) | worker step / vLLM TPOT |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    keyed = {s: {(r["batch"], r["context"]): r for r in rows} for s, rows in steps.items()}
    shapes = sorted({k for rows in keyed.values() for k in rows})
    for batch, ctx in shapes:
        cells, tpots = [], {}
        for server in (VLLM, FASTSERVE):
            r = keyed.get(server, {}).get((batch, ctx))
            if r is None:
                cells.append("–")
                continue
            tpots[server] = r["tpot"]["median"]
            cells.append(f"{r['tpot']['median']:.1f} / {r['itl']['median']:.1f}")
        both = len(tpots) == 2 and tpots[VLLM]
        ratio = f"{tpots[FASTSERVE] / tpots[VLLM]:.2f}x" if both else "–"
        step = keyed.get(FASTSERVE, {}).get((batch, ctx), {}).get("worker_step_ms")
        step_cell = f"{step:.1f}" if step else "–"
        step_ratio = f"{step / tpots[VLLM]:.2f}x" if step and tpots.get(VLLM) else "–"
        lines.append(f"| {batch} / {ctx} | {cells[0]} | {cells[1]} | {ratio} | {step_cell} | {step_ratio} |")
    return "\n".join(lines)


def anchor_table(anchor: dict[str, dict]) -> str:
    lines = [
        "| server | out tok/s | TTFT mean / P99 (ms) | TPOT mean (ms) | ITL median (ms) | E2E mean (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for server, r in anchor.items():
        lines.append(
            f"| {server} | {r['output_throughput']:.1f} | {r['ttft']['mean']:.0f} / {r['ttft']['p99']:.0f} | "
            f"{r['tpot']['mean']:.1f} | {r['itl']['median']:.1f} | {r['e2el']['mean']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    """Throughput, TTFT (mean, P99), TPOT, E2E and P99 latency per output token against rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("output tok/s", lambda r: r["output_throughput"]),
        ("TTFT mean (s)", lambda r: r["ttft"]["mean"]),
        ("TTFT P99 (s)", lambda r: r["ttft"]["p99"]),
        ("TPOT mean (s)", lambda r: r["tpot"]["mean"]),
        ("E2E mean (s)", lambda r: r["jct"]["mean"]),
        ("latency per output token P99 (s)", lambda r: r["latency_per_token"]["p99"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (title, value) in zip(axes.flat, panels, strict=True):
        for server in (VLLM, FASTSERVE):
            runs = sorted((r for r in results if r["server"] == server), key=lambda r: r["rate"])
            if runs:
                ax.plot([r["rate"] for r in runs], [value(r) for r in runs], marker="o", label=server)
        ax.set_xlabel("request rate (req/s)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
