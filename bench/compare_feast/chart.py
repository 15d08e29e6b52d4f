"""The chart of docs/benchmarks.md: p99 per online case and client, training-set seconds.

Runs in Feast's virtual environment (it has matplotlib; the project does not depend on it):
``python chart.py OUT.png`` with report.py's figures as JSON on stdin.
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

SERIES = [
    ("fs_inprocess_nomemo", "featurestream in-process, memo off", "#c6dbef", ".."),
    ("fs_inprocess", "featurestream in-process", "#1f77b4", ""),
    ("fs_inprocess_cache", "featurestream in-process, cache", "#aec7e8", "//"),
    ("feast_sdk", "Feast SDK", "#d62728", ""),
    ("fs_grpc_nomemo", "featurestream gRPC, memo off", "#c7e9c0", ".."),
    ("fs_grpc", "featurestream gRPC", "#2ca02c", ""),
    ("fs_grpc_cache", "featurestream gRPC, cache", "#98df8a", "//"),
    ("fs_rest_nomemo", "featurestream REST, memo off", "#dadaeb", ".."),
    ("fs_rest", "featurestream REST", "#9467bd", ""),
    ("fs_rest_cache", "featurestream REST, cache", "#c5b0d5", "//"),
    ("feast_server", "Feast HTTP server", "#ff7f0e", ""),
]

PLAIN = FuncFormatter(lambda y, _: f"{y:g}")


def main() -> None:
    figures = json.load(sys.stdin)
    clients = figures["clients"]
    training = [t for t in figures["training"] if t.get("feast_s") is not None or t.get("featurestream_s") is not None]
    panels = 1 + (1 if training else 0)
    fig, axes = plt.subplots(1, panels, figsize=(13 if panels == 2 else 9, 5.2),
                             gridspec_kw={"width_ratios": [2.2, 1]} if panels == 2 else None)
    ax = axes[0] if panels == 2 else axes
    cases = list(clients)
    width = 0.8 / len(SERIES)
    for i, (key, label, color, hatch) in enumerate(SERIES):
        xs = [c + (i - (len(SERIES) - 1) / 2) * width for c in range(len(cases))]
        ys = [clients[case].get(key, {}).get("p99_ms") or 0 for case in cases]
        ax.bar(xs, ys, width, label=label, color=color, hatch=hatch, edgecolor="white", linewidth=0.3)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(PLAIN)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([f"{c} (entities x features)" for c in cases])
    ax.set_ylabel("p99 latency, ms (log scale; lower is better)")
    ax.set_title("Online lookups, p99")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    if training:
        tx = axes[1]
        rows = [f"{t['rows']:,}" for t in training]
        xs = range(len(rows))
        fs = [t.get("featurestream_s") or 0 for t in training]
        tx.bar([x - 0.2 for x in xs], fs, 0.4, label="featurestream training-set", color="#1f77b4")
        tx.bar([x + 0.2 for x in xs], [t.get("feast_s") or 0 for t in training], 0.4,
               label="Feast get_historical_features", color="#d62728")
        for x, t in zip(xs, training, strict=True):
            for dx, side in ((-0.2, "featurestream"), (0.2, "feast")):
                if t.get(f"{side}_error"):
                    tx.annotate("failed\n(memory)" if "memory" in t[f"{side}_error"] else "failed", (x + dx, 1),
                                xycoords=("data", "axes fraction"), xytext=(0, -30), textcoords="offset points",
                                ha="center", va="top", fontsize=7, color="#d62728")
        tx.set_xticks(list(xs))
        tx.set_xticklabels(rows)
        tx.set_xlabel("label rows")
        tx.set_ylabel("seconds (lower is better)")
        tx.set_yscale("log")
        tx.yaxis.set_major_formatter(PLAIN)
        tx.yaxis.set_minor_formatter(PLAIN)
        tx.set_title("Point-in-time training set")
        tx.grid(axis="y", which="both", alpha=0.3)
        tx.legend(fontsize=8, loc="upper left")
    fig.suptitle(figures["title"], fontsize=11)
    fig.tight_layout()
    fig.savefig(sys.argv[1], dpi=110)


if __name__ == "__main__":
    main()
