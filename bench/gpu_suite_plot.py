"""The GPU suite's plot: one panel per kind of part (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _bars(ax, labels: list[str], series: dict[str, list[float | None]], ylabel: str) -> None:
    """Grouped bars, one group per label, one bar per series (a None value leaves a gap)."""
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width=width, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)


def _note(ax, title: str, text: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=8, transform=ax.transAxes)
    ax.set_axis_off()


def _attention(ax, result: dict) -> None:
    rows = result["results"]
    labels = [f"{r['model'][4:]} B{r['batch']} L{r['mean_context_len']}" for r in rows]
    series = {
        "triton": [r["triton_ms"] for r in rows],
        "torch gather+SDPA": [r["torch_sdpa_ms"] for r in rows],
    }
    if all("torch_path_ms" in r for r in rows):
        series["torch path"] = [r["torch_path_ms"] for r in rows]
    _bars(ax, labels, series, "ms per call")
    ax.set_yscale("log")
    worst = max(r["max_abs_err_vs_sdpa"] for r in rows)
    ax.set_title(f"decode attention (max abs diff {worst:.1e})", fontsize=9)


def _decode(ax, result: dict) -> None:
    rows = [r for r in result["rows"] if "error" not in r]
    labels = [f"{r['model']} b{r['batch']}" for r in rows]
    series = {"measured": [r["tokens_per_s"] for r in rows]}
    if any("bound_tokens_per_s" in r for r in rows):
        series["bandwidth bound"] = [r.get("bound_tokens_per_s") for r in rows]
    _bars(ax, labels, series, "decode tokens/s")
    ax.set_yscale("log")
    ax.set_title(f"decode vs bound ({result['bandwidth_gbs'] or '?'} GB/s)", fontsize=9)


def _swap(ax, result: dict) -> None:
    _bars(
        ax,
        [result["model"]],
        {"swap transfer": [result["transfer_seconds"]], "exposed": [result["exposed_seconds"]]},
        "seconds",
    )
    fraction = result["exposed_fraction"]
    ax.set_title(f"swap: exposed {'n/a' if fraction is None else f'{fraction:.1%}'} of transfer", fontsize=9)


def _live(ax, results: dict[str, dict]) -> None:
    labels = [name.removeprefix("live-") for name in results]
    bursts = [r["burst"] for r in results.values()]
    series = {
        "busy wall": [b["busy_wall_seconds"] for b in bursts],
        "worker compute": [b["worker_compute_seconds"] for b in bursts],
    }
    _bars(ax, labels, series, "seconds")
    ratios = ", ".join(f"{label} {b['ratio']:.2f}" for label, b in zip(labels, bursts, strict=True))
    ax.set_title(f"live burst: wall / compute = {ratios}", fontsize=9)


def plot_suite(report: dict, path: Path) -> None:
    """Attention, decode, swap and live panels from the suite's report; a part that did not
    produce numbers shows why instead."""
    sections = report["sections"]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    for ax, name, title, draw in (
        (axes[0], "attention", "decode attention", _attention),
        (axes[1], "decode", "decode vs bound", _decode),
        (axes[2], "swap", "swap", _swap),
    ):
        record = sections.get(name)
        if record is None:
            _note(ax, title, "not run")
        elif record["status"] != "ok":
            _note(ax, title, f"{record['status']}: {record.get('reason', '')}"[:300])
        else:
            draw(ax, record["result"])
    live = {n: s["result"] for n, s in sections.items() if n.startswith("live-") and s["status"] == "ok"}
    if live:
        _live(axes[3], live)
    else:
        _note(axes[3], "live burst", "no live part finished")
    fig.suptitle(f"GPU suite: {report.get('gpu', report['device'])}, {report['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
