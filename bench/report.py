"""Turns a pytest-benchmark JSON file into a Markdown report with PNG plots.

    pytest bench/ --benchmark-only --benchmark-json=results.json
    python -m bench.report results.json [--out bench/results/report]

Every comparison (a pytest-benchmark group) becomes a table of ours and its peers with the
ratio peer/ours (above 1: ours is faster) and, where the benchmark recorded its work, the rate
and the fraction of the group's ceiling; families of groups (the group name's first word) get a
bar chart each.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
from collections import defaultdict
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


@dataclass
class Result:
    group: str
    name: str
    role: str
    median_s: float
    work: float | None
    unit: str | None

    @property
    def rate(self) -> float | None:
        return self.work / self.median_s if self.work and self.median_s > 0 else None


def load(path: Path) -> tuple[list[Result], dict]:
    data = json.loads(path.read_text())
    results = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {})
        results.append(Result(
            group=b.get("group") or b["name"], name=b["name"], role=info.get("role", "?"),
            median_s=b["stats"]["median"], work=info.get("work"), unit=info.get("unit"),
        ))
    return results, data.get("machine_info", {})


def fmt_rate(rate: float | None, unit: str | None) -> str:
    if rate is None:
        return ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.2f} {prefix}{unit}/s"
    return f"{rate:.2f} {unit}/s"


def group_table(items: list[Result]) -> list[str]:
    ours = next((r for r in items if r.role == "ours"), None)
    ceiling = next((r for r in items if r.role == "ceiling" and r.rate), None)
    lines = ["| role | benchmark | median | rate | ratio peer/ours | of ceiling |", "|---|---|---|---|---|---|"]
    for r in items:
        ratio = f"{r.median_s / ours.median_s:.2f}x" if ours and r is not ours else ""
        frac = f"{r.rate / ceiling.rate:.0%}" if ceiling and r.rate and r is not ceiling else ""
        lines.append(f"| {r.role} | `{r.name}` | {r.median_s * 1e3:.3f} ms | {fmt_rate(r.rate, r.unit)} | {ratio} | {frac} |")
    return lines


def plot_family(family: str, groups: dict[str, list[Result]], out_dir: Path) -> Path:
    labels, values, colors = [], [], []
    palette = {"ours": "tab:blue", "peer": "tab:orange", "ceiling": "tab:gray"}
    use_rate = all(r.rate for items in groups.values() for r in items)
    for group, items in groups.items():
        for r in items:
            labels.append(f"{group}\n{r.name}" if len(groups) > 1 else r.name)
            values.append(r.rate if use_rate else r.median_s * 1e3)
            colors.append(palette.get(r.role, "tab:green"))
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.2))
    ax.barh(range(len(labels)), values, color=colors)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    unit = next((r.unit for items in groups.values() for r in items if r.unit), "")
    ax.set_xlabel(f"{unit}/s (higher is better)" if use_rate else "median ms (lower is better)")
    ax.set_title(f"{family}: ours (blue), peers (orange), ceilings (gray)")
    fig.tight_layout()
    path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', family)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: list[Result], machine: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    by_group: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_group[r.group].append(r)
    families: dict[str, dict[str, list[Result]]] = defaultdict(dict)
    for group, items in by_group.items():
        families[group.split()[0]][group] = items
    cpu = machine.get("cpu", {}).get("brand_raw") or platform.processor() or machine.get("machine", "")
    lines = [f"# Benchmark report, {date.today().isoformat()}", "",
             f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores; python {machine.get('python_version', '?')}.",
             "Ratios are peer median / our median, measured in the same run (above 1: ours is faster).", ""]
    for family, groups in sorted(families.items()):
        png = plot_family(family, groups, out_dir)
        lines += [f"## {family}", "", f"![{family}]({png.name})", ""]
        for group, items in groups.items():
            lines += [f"### {group}", "", *group_table(items), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json output")
    parser.add_argument("--out", type=Path, default=Path("bench/results/report"), help="output folder")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results file not found: {args.results}")
    results, machine = load(args.results)
    if not results:
        parser.error(f"no benchmarks in {args.results}")
    print(write_report(results, machine, args.out))


if __name__ == "__main__":
    main()
