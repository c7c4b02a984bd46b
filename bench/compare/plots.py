"""PNG plots of a comparison run (matplotlib, no display)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"vllm": "tab:blue", "mesh": "tab:orange"}
LABELS = {"vllm": "vLLM server", "mesh": "mesh (Envoy)"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values: list[float], side: str) -> None:
    if not values:
        return
    xs = sorted(values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", color=COLORS[side], label=f"{LABELS[side]} (n={len(xs)})")


def distributions(samples: dict[int, dict[str, dict[str, list[float]]]], metric: str, title: str,
                  out: Path) -> None:
    """CDFs of `metric` (ms) per concurrency; samples[c][side][metric] -> values in ms."""
    plt = _plt()
    concs = sorted(samples)
    fig, axes = plt.subplots(1, len(concs), figsize=(4.2 * len(concs), 3.4), squeeze=False)
    for ax, c in zip(axes[0], concs, strict=True):
        pooled = []
        for side in ("vllm", "mesh"):
            values = samples[c].get(side, {}).get(metric, [])
            _cdf(ax, values, side)
            pooled += values
        if pooled:  # the far tail (a few stalls) would squash the curves; its share shows at the right edge
            pooled.sort()
            ax.set_xlim(0, pooled[min(len(pooled) - 1, int(len(pooled) * 0.995))] * 1.1)
        ax.set_title(f"concurrency {c}")
        ax.set_xlabel(f"{metric.upper()} (ms)")
        ax.set_ylabel("fraction of requests" if metric == "ttft" else "fraction of tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def throughput(points: list[dict[str, Any]], per_round: dict[int, dict[str, list[float]]], out: Path) -> None:
    """Output tokens/s by concurrency: medians as lines, each round as a dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    concs = [p["concurrency"] for p in points]
    for side in ("vllm", "mesh"):
        ax.plot(concs, [p["output_throughput"][side] for p in points], marker="o", color=COLORS[side],
                label=LABELS[side])
        for c in concs:
            vals = per_round.get(c, {}).get(side, [])
            ax.scatter([c] * len(vals), vals, color=COLORS[side], alpha=0.35, s=14)
    ax.set_xscale("log", base=2)
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.set_xlabel("concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Steady load: 128 in / 64 out")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def overload_timeline(runs: dict[str, list[dict[str, Any]]], slo_s: float, out: Path) -> None:
    """TTFT of each completed request (and refusals at the bottom) against its send time."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.2 * len(runs), 3.6), squeeze=False, sharey=True)
    for ax, (side, outcomes) in zip(axes[0], runs.items(), strict=True):
        done = [o for o in outcomes if o["completed"]]
        ax.scatter([o["start"] for o in done], [o["ttft_s"] for o in done], s=6, color=COLORS[side],
                   label="completed: TTFT")
        refused = [o for o in outcomes if o["status"] == 429]
        if refused:
            ax.scatter([o["start"] for o in refused], [o["status_s"] for o in refused], s=6, color="tab:red",
                       marker="x", label="refused: time to 429")
        ax.axhline(slo_s, color="gray", linestyle="--", label=f"SLO {slo_s:g} s")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_title(LABELS[side])
        ax.set_xlabel("sent at (s)")
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Overload: 3x the sustainable rate")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
