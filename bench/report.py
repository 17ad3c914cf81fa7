"""Turns a pytest-benchmark JSON file into a Markdown report with PNG plots.

    pytest bench/ --benchmark-only --benchmark-json=results.json --junitxml=junit.xml
    python -m bench.report results.json [--junit junit.xml] [--out DIR]

Without ``--out`` the report goes to bench/results/<machine>-<date>/ (``cpu-2026-11-29``, or
``gpu-<name>-<date>`` when the run has CUDA results): report.md, its PNGs, a copy of the JSON.

Sections: a summary of every comparison (ratio peer/ours, above 1: ours is faster), the machine's
ceilings, GEMM throughput by shape against the matmul ceiling, dispatch/combine bandwidth by size
against the loopback all_to_all ceiling, the pipeline steps against the simulator and their
timelines, MFU, scaling curves, the peers that were skipped and why (from ``--junit``), and a
table per comparison.

"Of ceiling": a result's rate over the rate of its ceiling. The ceiling is a "ceiling" entry in
the result's own group when there is one (bench_comm's raw all_to_all, bench_gemm's read
bandwidth); otherwise the machine ceiling of its kind measured in the same run on the same device
(bench_ceilings.py): FLOP results against the fastest matmul, byte results of a group that names
ranks against the all_to_all of the nearest size, other byte results against the memory copy. A
benchmark may name its kind in ``extra_info["ceiling"]``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import xml.etree.ElementTree as ET
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TIMELINE_PATTERNS = ("dualpipe*_measured.png", "dualpipe*_simulated.png", "*timeline*.png")
_RANKS = re.compile(r"(\d+)\s+(?:gloo\s+|nccl\s+)?ranks?\b")


@dataclass
class Result:
    group: str
    name: str
    role: str
    median_s: float
    work: float | None = None
    unit: str | None = None
    info: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    @property
    def rate(self) -> float | None:
        return self.work / self.median_s if self.work and self.median_s > 0 else None

    @property
    def device(self) -> str:
        return self.info.get("device") or ("cuda" if "cuda" in self.group.lower() else "cpu")

    @property
    def label(self) -> str:
        """The case's short name: its string parameters (``ours``, ``matmul_bf16``), else its id."""
        if self.info.get("impl"):
            return str(self.info["impl"])
        # pytest-benchmark stores non-JSON parameters (torch dtypes) as "UNSERIALIZABLE[torch.x]"
        words = [re.sub(r"^UNSERIALIZABLE\[(.*)\]$", r"\1", v).removeprefix("torch.")
                 for v in self.params.values() if isinstance(v, str)]
        if words:
            return "-".join(words)
        m = re.search(r"\[(.*)\]", self.name)
        return m.group(1) if m else self.name

    @property
    def ranks(self) -> int | None:
        if "ranks" in self.info:
            return int(self.info["ranks"])
        m = _RANKS.search(self.group)
        return int(m.group(1)) if m else None


def load(path: Path) -> tuple[list[Result], dict]:
    """The results and the run's metadata (machine_info, commit_info, datetime)."""
    data = json.loads(path.read_text())
    results = []
    for b in data.get("benchmarks", []):
        info = b.get("extra_info", {}) or {}
        results.append(Result(group=b.get("group") or b["name"], name=b["name"], role=info.get("role", "?"),
                              median_s=b["stats"]["median"], work=info.get("work"), unit=info.get("unit"),
                              info=info, params=b.get("params") or {}))
    meta = {k: data.get(k) for k in ("machine_info", "commit_info", "datetime")}
    return results, meta


def load_skips(junit: Path) -> list[tuple[str, str]]:
    """(test id, reason) of every skipped test in a pytest --junitxml file, except the cases that
    --quick or the cuda marker deselect by design (they are not missing peers)."""
    out = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        skip = case.find("skipped")
        if skip is None:
            continue
        reason = skip.get("message", "").removeprefix("Skipped: ").strip()
        if "--quick selection" in reason:
            continue
        out.append((f"{case.get('classname', '')}::{case.get('name', '')}", reason))
    return out


# ---------------------------------------------------------------------------------------- ceilings
def ceiling_kind(r: Result) -> str | None:
    """What a ceiling entry measures: matmul, memory or all_to_all."""
    if "kind" in r.info:
        return r.info["kind"]
    g = r.group.lower()
    if "all_to_all" in g or "all-to-all" in g:
        return "all_to_all"
    if "matmul" in g or (r.unit == "FLOP" and "peak" in g):
        return "matmul"
    if any(w in g for w in ("copy", "memory", "bandwidth")):
        return "memory"
    return None


def wanted_kind(r: Result) -> str | None:
    """Which machine ceiling a result compares against."""
    if "ceiling" in r.info:
        return r.info["ceiling"]
    if r.unit == "FLOP":
        return "matmul"
    if r.unit == "B":
        return "all_to_all" if r.ranks else "memory"
    return None


def machine_ceilings(results: list[Result]) -> list[Result]:
    """Ceiling entries of groups that hold no "ours": the machine's own limits."""
    with_ours = {r.group for r in results if r.role == "ours"}
    return [r for r in results if r.role == "ceiling" and r.group not in with_ours and r.rate]


def ceiling_for(r: Result, results: list[Result], machine: list[Result]) -> Result | None:
    if r.role == "ceiling" or not r.rate:
        return None
    own = [c for c in results if c.group == r.group and c.role == "ceiling" and c.rate and c.unit == r.unit]
    if own:
        return own[0]
    kind = wanted_kind(r)
    pool = [c for c in machine if ceiling_kind(c) == kind and c.device == r.device and c.unit == r.unit]
    if not pool:
        return None
    if kind == "all_to_all":  # the same number of ranks if measured, then the nearest size
        same = [c for c in pool if c.ranks == r.ranks]
        return min(same or pool, key=lambda c: abs(math.log(c.work / r.work)))
    return max(pool, key=lambda c: c.rate)


# ---------------------------------------------------------------------------------------- formatting
def fmt_rate(rate: float | None, unit: str | None) -> str:
    if rate is None:
        return ""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.2f} {prefix}{unit}/s"
    return f"{rate:.2f} {unit}/s"


def fmt_bytes(n: float) -> str:
    for scale, prefix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.3g} {prefix}"
    return f"{n:.0f} B"


def fmt_frac(x: float) -> str:
    return f"{x:.0%}" if x >= 0.095 else f"{x:.1%}"


def fraction(r: Result, ceiling: Result | None) -> str:
    return fmt_frac(r.rate / ceiling.rate) if ceiling and r.rate else ""


def ceiling_name(c: Result) -> str:
    kind = ceiling_kind(c)
    return f"{kind} {c.label}" if kind and kind not in c.label else c.label


def group_table(items: list[Result], results: list[Result], machine: list[Result]) -> list[str]:
    ours = next((r for r in items if r.role == "ours"), None)
    lines = ["| role | benchmark | median | rate | ratio peer/ours | of ceiling | ceiling |",
             "|---|---|---|---|---|---|---|"]
    for r in items:
        ratio = f"{r.median_s / ours.median_s:.2f}x" if ours and r is not ours else ""
        c = ceiling_for(r, results, machine)
        lines.append(f"| {r.role} | `{r.name}` | {r.median_s * 1e3:.3f} ms | {fmt_rate(r.rate, r.unit)} | {ratio} "
                     f"| {fraction(r, c)} | {f'{ceiling_name(c)} ({c.group})' if c else ''} |")
    return lines


def summary_table(by_group: dict[str, list[Result]], results: list[Result], machine: list[Result]) -> list[str]:
    lines = ["| comparison | ours | ours of ceiling | peers: peer median / our median |", "|---|---|---|---|"]
    for group, items in sorted(by_group.items()):
        ours = next((r for r in items if r.role == "ours"), None)
        if ours is None:
            continue
        peers = ", ".join(f"{p.label} {p.median_s / ours.median_s:.2f}x" for p in items if p.role == "peer")
        ceil = ceiling_for(ours, results, machine)
        ceil_txt = f"{fraction(ours, ceil)} of {ceiling_name(ceil)}" if ceil else ""
        lines.append(f"| {group} | {ours.median_s * 1e3:.3f} ms {fmt_rate(ours.rate, ours.unit)} | {ceil_txt} | {peers} |")
    return lines


# ---------------------------------------------------------------------------------------- sections
def _is_gemm(r: Result) -> bool:
    return bool(re.search(r"gemm|grouped", r.group, re.I)) and r.role != "ceiling"


def section_gemm(results, machine, out: Path, plots) -> list[str]:
    lines = []
    for device in sorted({r.device for r in results if _is_gemm(r) and r.unit == "FLOP"}):
        rows = [r for r in results if _is_gemm(r) and r.unit == "FLOP" and r.device == device and r.rate]
        ceilings = [c for c in machine if ceiling_kind(c) == "matmul" and c.device == device]
        png = plots.bars_by_category(rows, ceilings, out / f"gemm_{device}.png",
                                     f"GEMM throughput by shape, {device} (dashed: matmul ceilings)", "FLOP/s")
        lines += [f"### {device}", "", *([f"![GEMM {device}]({png.name})", ""] if png else [])]
        lines += ["| shape (group) | case | rate | of ceiling |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.group} | {r.label} | {fmt_rate(r.rate, r.unit)} | {fraction(r, ceiling_for(r, results, machine))} |")
        lines.append("")
    return lines


def section_comm(results, machine, out: Path, plots) -> list[str]:
    rows = [r for r in results if r.unit == "B" and r.ranks and r.rate and r.group not in {c.group for c in machine}]
    ceilings = [c for c in machine if ceiling_kind(c) == "all_to_all"]
    if not rows and not ceilings:
        return []
    png = plots.rate_by_size(rows, ceilings, out / "comm_bandwidth.png")
    lines = [*([f"![bandwidth by size]({png.name})", ""] if png else []),
             "| group | case | bytes received per rank | bandwidth | of all_to_all ceiling |", "|---|---|---|---|---|"]
    for r in sorted(rows + ceilings, key=lambda r: (r.group, r.work)):
        c = ceiling_for(r, results, machine)
        lines.append(f"| {r.group} | {r.label} | {fmt_bytes(r.work)} | {fmt_rate(r.rate, r.unit)} | {fraction(r, c)} |")
    return [*lines, ""]


def section_pipeline(results, out: Path, timeline_dir: Path | None) -> list[str]:
    # bench_dualpipe records the simulator's prediction as predicted_s (or simulated_s, with the
    # step measured inside the ranks as step_s)
    rows = [r for r in results if "predicted_s" in r.info or "simulated_s" in r.info]
    lines = []
    if rows:
        lines += ["| group | case | measured | simulator | measured / simulated |", "|---|---|---|---|---|"]
        for r in rows:
            p = float(r.info.get("predicted_s", r.info.get("simulated_s")))
            m = float(r.info.get("step_s", r.median_s))
            lines.append(f"| {r.group} | {r.label} | {m * 1e3:.1f} ms | {p * 1e3:.1f} ms | {m / p:.3f} |")
        lines.append("")
    if timeline_dir and timeline_dir.is_dir():
        seen = set()
        for pattern in TIMELINE_PATTERNS:
            for src in sorted(timeline_dir.glob(pattern)):
                if src.name in seen:
                    continue
                seen.add(src.name)
                dst = out / src.name
                if src.resolve() != dst.resolve():
                    shutil.copyfile(src, dst)
                when = datetime.fromtimestamp(src.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
                lines += [f"![{src.stem}]({src.name})", "", f"*{src.name}, written {when} by bench/bench_dualpipe.py*", ""]
    return lines


def section_mfu(results, out: Path, plots) -> list[str]:
    rows = [r for r in results if "mfu" in r.info]
    if not rows:
        return []
    png = plots.mfu_bars(rows, out / "mfu.png")
    lines = [*([f"![MFU]({png.name})", ""] if png else []),
             "| group | case | tokens/s | FLOPs/s | MFU | peak |", "|---|---|---|---|---|---|"]
    for r in rows:
        peak = r.info.get("peak") or fmt_rate(r.info.get("peak_flops"), "FLOP")
        tok = r.info.get("tokens_per_s")
        lines.append(f"| {r.group} | {r.label} | {tok:,.0f} | {fmt_rate(r.rate, r.unit)} | {100 * r.info['mfu']:.2f}% | {peak} |"
                     if tok else f"| {r.group} | {r.label} |  | {fmt_rate(r.rate, r.unit)} | {100 * r.info['mfu']:.2f}% | {peak} |")
    return [*lines, ""]


def section_scaling(results, out: Path, plots) -> list[str]:
    axes: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        if "axis" in r.info and "x" in r.info:
            axes[r.info["axis"]].append(r)
    lines = []
    for axis, rows in sorted(axes.items()):
        rows.sort(key=lambda r: float(r.info["x"]))
        png = plots.scaling_curve(axis, rows, out / f"scaling_{re.sub(r'[^A-Za-z0-9]+', '_', axis)}.png")
        base = rows[0]
        lines += [f"### step time vs {axis}", "", f"{rows[0].group}", ""]
        lines += [*([f"![scaling {axis}]({png.name})", ""] if png else []),
                  f"| {axis} | step time | step time vs first point | {axis} vs first point | tokens/s |", "|---|---|---|---|---|"]
        for r in rows:
            x = float(r.info["x"])
            tok = r.info.get("tokens")
            lines.append(f"| {r.info['x']} | {r.median_s * 1e3:.1f} ms | {r.median_s / base.median_s:.2f}x "
                         f"| {x / float(base.info['x']):.2f}x | {f'{tok / r.median_s:,.0f}' if tok else ''} |")
        lines.append("")
    return lines


# ---------------------------------------------------------------------------------------- report
def default_out_dir(results: list[Result], meta: dict) -> Path:
    when = (meta.get("datetime") or date.today().isoformat())[:10]
    gpus = sorted({r.info["gpu"] for r in results if r.info.get("gpu")})
    if gpus or any(r.device == "cuda" for r in results):
        name = "gpu-" + re.sub(r"[^A-Za-z0-9]+", "-", gpus[0] if gpus else "cuda").strip("-").lower()
    else:
        name = "cpu"
    return RESULTS_DIR / f"{name}-{when}"


def machine_line(results: list[Result], meta: dict) -> str:
    m = meta.get("machine_info") or {}
    cpu = (m.get("cpu") or {}).get("brand_raw") or platform.processor() or m.get("machine", "?")
    cores = (m.get("cpu") or {}).get("count", "?")
    gpus = sorted({r.info["gpu"] for r in results if r.info.get("gpu")})
    line = f"Machine: {cpu}, {cores} cores" + (f"; GPU: {', '.join(gpus)}" if gpus else "")
    line += f"; Python {m.get('python_version', '?')}"
    loads = [float(r.info["loadavg"]) for r in results if "loadavg" in r.info]
    if loads:  # recorded by the ceilings and the MFU benchmark
        line += f"; load average while measuring {min(loads):.1f}-{max(loads):.1f}"
        if isinstance(cores, int) and max(loads) > cores:
            line += f" (**more runnable processes than the {cores} cores: absolute numbers are depressed**)"
    commit = meta.get("commit_info") or {}
    if commit.get("id"):
        line += f"; commit {commit['id'][:10]}{' (dirty)' if commit.get('dirty') else ''}"
    return line + "."


def write_report(results: list[Result], meta: dict, out_dir: Path, skips: list[tuple[str, str]] | None = None,
                 timeline_dir: Path | None = RESULTS_DIR) -> Path:
    from bench import report_plots as plots

    out_dir.mkdir(parents=True, exist_ok=True)
    by_group: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        by_group[r.group].append(r)
    machine = machine_ceilings(results)
    when = (meta.get("datetime") or date.today().isoformat())[:16].replace("T", " ")
    sources = meta.get("sources") or []
    origin = (f"Merged from {len(sources)} runs on this machine ({', '.join(sources)}): a ratio inside one "
              "comparison comes from one run, a fraction of a ceiling may not." if len(sources) > 1
              else "Every number was measured in this one run.")
    lines = [f"# Benchmark report, {when} UTC", "", machine_line(results, meta),
             f"{origin} Ratios are peer median / our median (above 1: ours is faster); \"of ceiling\" is a rate "
             "over the machine's measured limit of the same kind (above 100%: the ceiling was measured at a busier "
             "moment, or its problem shape is less efficient than the result's).", ""]
    if not plots.available():
        lines += ["(matplotlib is not installed: tables only, no plots)", ""]
    lines += ["## Summary", "", *summary_table(by_group, results, machine), ""]
    if machine:
        lines += ["## Machine ceilings (measured in this run)", "", "| kind | group | case | rate |", "|---|---|---|---|"]
        lines += [f"| {ceiling_kind(c)} | {c.group} | {c.label} | {fmt_rate(c.rate, c.unit)} |" for c in machine]
        lines.append("")
    sections = [("GEMM throughput by shape", section_gemm(results, machine, out_dir, plots)),
                ("Dispatch/combine bandwidth by size", section_comm(results, machine, out_dir, plots)),
                ("Pipeline schedules", section_pipeline(results, out_dir, timeline_dir)),
                ("MFU", section_mfu(results, out_dir, plots)),
                ("Scaling", section_scaling(results, out_dir, plots))]
    for title, body in sections:
        if body:
            lines += [f"## {title}", "", *body]
    if skips:
        by_reason: dict[str, list[str]] = defaultdict(list)
        for test, why in skips:
            by_reason[why].append(test)
        lines += ["## Skipped (peers or cases that could not run here, with the reason)", "",
                  "| reason | tests |", "|---|---|"]
        lines += [f"| {why} | {', '.join(f'`{t}`' for t in tests)} |" for why, tests in by_reason.items()]
        lines.append("")
    lines += ["## Every comparison", ""]
    families: dict[str, dict[str, list[Result]]] = defaultdict(dict)
    for group, items in by_group.items():
        families[group.split()[0]][group] = items
    for family, groups in sorted(families.items()):
        png = plots.family_bars(family, groups, out_dir)
        lines += [f"### {family}", "", *([f"![{family}]({png.name})", ""] if png else [])]
        for group, items in groups.items():
            lines += [f"#### {group}", "", *group_table(items, results, machine), ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+",
                        help="pytest-benchmark --benchmark-json output(s); with several, a later file's case "
                             "replaces an earlier one of the same name (e.g. a full run of one file over a --quick run)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench/results/<cpu|gpu-NAME>-<date of the run>)")
    parser.add_argument("--junit", type=Path, nargs="*", default=[], help="pytest --junitxml of the same run(s): lists skips")
    parser.add_argument("--timelines", type=Path, default=RESULTS_DIR, help="folder with the pipeline timeline PNGs")
    args = parser.parse_args(argv)
    for path in [*args.results, *args.junit]:
        if not path.is_file():
            parser.error(f"results file not found: {path}")
    merged: dict[tuple[str, str], Result] = {}
    raw: dict[tuple[str, str], dict] = {}
    meta: dict = {}
    for path in args.results:
        try:
            results, this_meta = load(path)
            benches = json.loads(path.read_text())["benchmarks"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            parser.error(f"{path} is not a pytest-benchmark JSON file ({err!r})")
        meta = meta or this_meta
        for r, b in zip(results, benches, strict=True):
            merged[(r.group, r.name)], raw[(r.group, r.name)] = r, b
    if not merged:
        parser.error(f"no benchmarks in {', '.join(map(str, args.results))}")
    results = list(merged.values())
    out = args.out or default_out_dir(results, meta)
    skips = [s for j in args.junit for s in load_skips(j)] or None
    meta["sources"] = [p.name for p in args.results]
    path = write_report(results, meta, out, skips, args.timelines)
    (out / "results.json").write_text(json.dumps({**meta, "sources": [str(p) for p in args.results],
                                                  "benchmarks": list(raw.values())}, indent=1))
    print(path)


if __name__ == "__main__":
    main()
