"""bench.report: ratios and rates computed from a pytest-benchmark JSON, plots written."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench.report import main


def _bench(group: str, name: str, role: str, median: float, work: float | None = None) -> dict:
    info = {"role": role}
    if work:
        info.update(work=work, unit="FLOP")
    return {"group": group, "name": name, "stats": {"median": median}, "extra_info": info}


def test_report_states_ratios_rates_and_fraction_of_ceiling(tmp_path: Path) -> None:
    ours, peer = random.uniform(0.01, 0.1), random.uniform(0.1, 1.0)
    work = 1e9
    data = {"machine_info": {"python_version": "3.x"}, "benchmarks": [
        _bench("gemm 64x64", "ours_case", "ours", ours, work),
        _bench("gemm 64x64", "peer_case", "peer", peer, work),
        _bench("gemm 64x64", "peak", "ceiling", ours / 2, work),
    ]}
    results = tmp_path / "results.json"
    results.write_text(json.dumps(data))
    main([str(results), "--out", str(tmp_path / "out")])
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"{peer / ours:.2f}x" in report
    assert f"{work / ours / 1e9:.2f} GFLOP/s" in report
    assert "50%" in report  # ours runs at half the ceiling's rate
    assert (tmp_path / "out" / "gemm.png").stat().st_size > 1000


def test_missing_results_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json")])
