"""Plots of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_latency_vs_rate(results: list[dict], slo: float, path: str, stat: str = "mean") -> None:
    """Latency per output token against request rate, one line per (policy, swap policy)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list[tuple[float, float]]] = {}
    for r in results:
        label = (
            r["policy"]
            if r.get("swap_policy", "proactive") == "proactive"
            else f"{r['policy']} ({r['swap_policy']})"
        )
        series.setdefault(label, []).append((r["rate"], r["latency_per_token"][stat]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.axhline(slo, color="grey", linestyle="--", label=f"SLO {slo}s/token")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"{stat} latency per output token (s)")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
