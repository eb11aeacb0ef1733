"""Plots of benchmark results (matplotlib, Agg: no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _label(r: dict) -> str:
    return r.get("group") or r["policy"]


def plot_latency_vs_rate(
    results: list[dict], slo: float, path: str, stats: tuple[str, ...] = ("mean", "p95")
) -> None:
    """Latency per output token against request rate, one line per policy, one panel per statistic."""
    fig, axes = plt.subplots(1, len(stats), figsize=(5.5 * len(stats), 4), squeeze=False)
    for ax, stat in zip(axes[0], stats, strict=True):
        series: dict[str, list[tuple[float, float]]] = {}
        for r in results:
            series.setdefault(_label(r), []).append((r["rate"], r["latency_per_token"][stat]))
        for label, points in series.items():
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.axhline(slo, color="grey", linestyle="--", label=f"SLO {slo} s/token")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"{stat} latency per output token (s)")
        ax.set_yscale("log")
        workload = results[0].get("workload", "") if results else ""
        ax.set_title(f"{workload}: {stat}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sensitivity(results: list[dict], path: str, metric: str = "throughput_at_slo") -> None:
    """One panel per (workload, knob): `metric` against the knob's value, the default marked."""
    workloads = list(dict.fromkeys(r["workload"] for r in results))
    knobs = list(dict.fromkeys(r["knob"] for r in results))
    fig, axes = plt.subplots(
        len(workloads), len(knobs), figsize=(3.6 * len(knobs), 3 * len(workloads)), squeeze=False
    )
    for row, workload in enumerate(workloads):
        for col, knob in enumerate(knobs):
            ax = axes[row][col]
            points = [r for r in results if r["workload"] == workload and r["knob"] == knob]
            labels = [r["label"] for r in points]
            # never crossed within the sweep: a hatched bar at the highest rate tried (a lower bound)
            values = [
                r[metric]
                if r[metric] is not None
                else (r.get("max_rate", 0.0) if r.get("throughput_status") == "never_crossed" else 0.0)
                for r in points
            ]
            colors = ["tab:red" if r.get("is_default") else "tab:blue" for r in points]
            hatches = ["//" if r[metric] is None else "" for r in points]
            for x, (v, c, h) in enumerate(zip(values, colors, hatches, strict=True)):
                ax.bar(x, v, color=c, hatch=h)
            ax.set_xticks(range(len(points)), labels, rotation=45, fontsize=7)
            ax.set_title(f"{workload}: {knob}", fontsize=9)
            if col == 0:
                ax.set_ylabel(metric.replace("_", " "), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
