"""The PNG plots of bench/report.py. Each function returns the file it wrote, or None when
matplotlib is not installed (the GPU machine may lack it: the report then has tables only)."""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.report import Result

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # tables only
    plt = None

PALETTE = {"ours": "tab:blue", "peer": "tab:orange", "ceiling": "tab:gray"}


def available() -> bool:
    return plt is not None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(group: str, limit: int = 38) -> str:
    return group if len(group) <= limit else group[: limit - 1] + "…"


def bars_by_category(rows: list[Result], ceilings: list[Result], path: Path, title: str, unit: str) -> Path | None:
    """Grouped bars: one category per benchmark group (a shape), one bar per case; the ceilings
    as dashed horizontal lines."""
    if plt is None or not rows:
        return None
    groups = list(dict.fromkeys(r.group for r in rows))
    labels = list(dict.fromkeys(r.label for r in rows))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(7, 1.6 * len(groups) + 3), 4.5))
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        xs, ys = [], []
        for j, g in enumerate(groups):
            r = next((r for r in rows if r.group == g and r.label == label), None)
            if r is not None:
                xs.append(j + (i - (len(labels) - 1) / 2) * width)
                ys.append(r.rate)
        ax.bar(xs, ys, width, label=label, color=cmap(i % 10))
    for k, c in enumerate(ceilings):
        ax.axhline(c.rate, ls="--", color="gray" if k == 0 else "silver", lw=1)
        ax.text(len(groups) - 0.5, c.rate, f" {c.label} ceiling", va="bottom", ha="right", fontsize=7, color="dimgray")
    ax.set_xticks(range(len(groups)), [_short(g) for g in groups], fontsize=7, rotation=15, ha="right")
    ax.set_ylabel(f"{unit} (higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def rate_by_size(rows: list[Result], ceilings: list[Result], path: Path) -> Path | None:
    """Bandwidth (bytes received per rank / s) against bytes per call, log-log: each case a
    series, the loopback all_to_all ceiling as a gray line."""
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    series: dict[str, list[Result]] = defaultdict(list)
    for r in rows:
        series[f"{r.label} ({_short(r.group, 30)})"].append(r)
    for name, pts in series.items():
        pts.sort(key=lambda r: r.work)
        ax.plot([r.work for r in pts], [r.rate for r in pts], "o-", label=name, ms=5)
    by_ranks: dict[int | None, list[Result]] = defaultdict(list)
    for c in ceilings:
        by_ranks[c.ranks].append(c)
    for ranks, pts in by_ranks.items():
        pts.sort(key=lambda r: r.work)
        ax.plot([c.work for c in pts], [c.rate for c in pts], "s--", color="gray", label=f"all_to_all ceiling, {ranks} ranks")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes received per rank per call")
    ax.set_ylabel("B/s received per rank")
    ax.set_title("dispatch/combine bandwidth by size", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def mfu_bars(rows: list[Result], path: Path) -> Path | None:
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    labels = [f"{_short(r.group, 50)}\n{r.label}" for r in rows]
    ax.barh(range(len(rows)), [100 * r.info["mfu"] for r in rows], color=[PALETTE.get(r.role, "tab:green") for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MFU, % of the device peak (higher is better)")
    ax.set_title("model FLOPs utilisation", fontsize=10)
    return _save(fig, path)


def scaling_curve(axis: str, rows: list[Result], path: Path) -> Path | None:
    """Step time against the axis, with the proportional line through the first point."""
    if plt is None:
        return None
    xs = [float(r.info["x"]) for r in rows]
    ys = [r.median_s * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, "o-", label="measured step time")
    ax.plot(xs, [ys[0] * x / xs[0] for x in xs], ":", color="gray", label="proportional to the first point")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(axis)
    ax.set_ylabel("step time, ms")
    ax.set_title(_short(rows[0].group, 70), fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path)


def family_bars(family: str, groups: dict[str, list[Result]], out_dir: Path) -> Path | None:
    """One horizontal bar per case of every group of a family: rates when all have one, else ms."""
    if plt is None:
        return None
    labels, values, colors = [], [], []
    use_rate = all(r.rate for items in groups.values() for r in items)
    for group, items in groups.items():
        for r in items:
            labels.append(f"{_short(group, 50)}\n{r.label}" if len(groups) > 1 else r.label)
            values.append(r.rate if use_rate else r.median_s * 1e3)
            colors.append(PALETTE.get(r.role, "tab:green"))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    unit = next((r.unit for items in groups.values() for r in items if r.unit), "")
    ax.set_xlabel(f"{unit}/s (higher is better)" if use_rate else "median ms (lower is better)")
    ax.set_title(f"{family}: ours (blue), peers (orange), ceilings (gray)", fontsize=10)
    return _save(fig, out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', family)}.png")
