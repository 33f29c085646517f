"""The overhead plot: tokens/s against batch size, driver and in-process engine, from overhead.json."""

from __future__ import annotations

import json
from pathlib import Path


def plot_overhead(overhead_json: str | Path, png: str | Path, title: str | None = None) -> Path:
    """Write a PNG of served tokens/s against batch size (needs the `bench` extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(overhead_json).read_text())
    rows = data["batches"]
    batches = [r["batch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(batches, [r["in_process_tokens_per_s"] for r in rows], "o-", label="engine in-process")
    ax.plot(batches, [r["driver_tokens_per_s"] for r in rows], "s--", label="through the driver")
    for r in rows:
        ax.annotate(f"{r['ratio']:.2f}x", (r["batch"], r["driver_tokens_per_s"]), textcoords="offset points",
                    xytext=(4, -12), fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (contexts per decode step)")
    ax.set_ylabel("tokens/s")
    quick = " (--quick: smoke test, not a measurement)" if data.get("quick") else ""
    ax.set_title(title or f"{data['engine']} engine, {data['size']} model, {data['device']} {data['dtype']}{quick}",
                 fontsize=9 if quick else None)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
