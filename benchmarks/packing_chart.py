"""The chart of benchmarks/packing.py: rows/s of rows answered right, and the share of rows answered,
per scenario and packing (bars side by side, one colour per packing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def chart(ms: list[Any], path: Path) -> None:
    """``ms``: the run's measurements (``scenario``, ``packing``, ``rows_per_s``, ``right``, ``rows``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(m.scenario for m in ms))
    packings = list(dict.fromkeys(m.packing for m in ms))
    by = {(m.scenario, m.packing): m for m in ms}
    width = 0.8 / len(packings)
    fig, (speed, answered) = plt.subplots(1, 2, figsize=(12, 4.5))
    for k, packing in enumerate(packings):
        xs = [i + (k - (len(packings) - 1) / 2) * width for i in range(len(scenarios))]
        found = [by.get((s, packing)) for s in scenarios]
        rates = [m.rows_per_s if m else 0.0 for m in found]
        shares = [100.0 * m.right / m.rows if m and m.rows else 0.0 for m in found]
        bars = speed.bar(xs, rates, width, label=packing)
        speed.bar_label(bars, fmt="%.0f", fontsize=8)
        bars = answered.bar(xs, shares, width, label=packing)
        answered.bar_label(bars, fmt="%.0f%%", fontsize=8)
    for axis, title in ((speed, "rows/s answered right"), (answered, "rows answered right (%)")):
        axis.set_xticks(range(len(scenarios)), scenarios)
        axis.set_title(title)
    answered.set_ylim(0, 110)
    speed.legend(fontsize=8)
    fig.suptitle("Packing rows: 3 scenarios, one server, one run (ratios matter, not absolute numbers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
