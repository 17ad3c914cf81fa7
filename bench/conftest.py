"""Benchmark conventions: every comparison is a pytest-benchmark group holding ours and its
peers, measured in the same run; the session ends with a table of ratios to each group's
baseline.

In a benchmark: ``benchmark.group = "<comparison>"`` (or ``@pytest.mark.benchmark(group=...)``),
``benchmark.extra_info["role"] = "ours" | "peer" | "ceiling"``, and optionally
``benchmark.extra_info["work"]`` (FLOPs or bytes per call) and ``["unit"]`` ("FLOP" or "B") so
rates are printed. ``--quick`` keeps only cases marked ``@pytest.mark.quick`` (one per
comparison), for CI.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--quick", action="store_true", default=False, help="run one case per comparison (CI)")
    parser.addoption("--ratios-json", default=None, help="also write the ratio table to this JSON file")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "quick: the one case of a comparison that --quick runs")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not config.getoption("--quick"):
        return
    skip = pytest.mark.skip(reason="not in the --quick selection")
    for item in items:
        if "quick" not in item.keywords:
            item.add_marker(skip)


def _rate(median: float, info: dict) -> str:
    work, unit = info.get("work"), info.get("unit")
    if not work or not median:
        return ""
    rate = work / median
    scale = next((s for s in ((1e12, "T"), (1e9, "G"), (1e6, "M")) if rate >= s[0]), (1.0, ""))
    return f"{rate / scale[0]:.2f} {scale[1]}{unit}/s"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    benches = getattr(session, "benchmarks", None) or []
    groups: dict[str, list] = defaultdict(list)
    for meta in benches:  # pytest-benchmark's Metadata: name, group, extra_info, stats
        if getattr(meta, "stats", None) is not None and meta.stats.rounds:
            groups[meta.group or meta.name].append(meta)
    if not groups:
        return
    rows = []
    tr = terminalreporter
    tr.section("ratios (peer median / our median: above 1 means ours is faster)")
    for group, items in sorted(groups.items()):
        ours = [b for b in items if b.extra_info.get("role") == "ours"]
        tr.write_line(f"[{group}]")
        for b in items:
            med = b.stats.median
            role = b.extra_info.get("role", "?")
            line = f"  {role:8s} {b.name:60s} median {med * 1e3:10.3f} ms  {_rate(med, b.extra_info)}"
            if ours and role != "ours":
                ratio = med / ours[0].stats.median
                line += f"  ratio {ratio:6.2f}x"
                rows.append({"group": group, "peer": b.name, "ours": ours[0].name, "ratio": ratio,
                             "peer_median_s": med, "ours_median_s": ours[0].stats.median,
                             "extra": {k: v for k, v in b.extra_info.items() if isinstance(v, (int, float, str))}})
            tr.write_line(line)
    path = config.getoption("--ratios-json")
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
