"""bench.report: ratios, rates, fractions of the right ceiling, and every section rendered from a
synthetic pytest-benchmark JSON (random medians, so the expected numbers are computed here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from bench import report, report_plots
from bench.report import ceiling_for, load, machine_ceilings, main

MIB = 2**20


def _bench(group: str, label: str, role: str, median: float, work: float | None = None, unit: str = "FLOP",
           **info) -> dict:
    info = {"role": role, **info}
    if work:
        info.update(work=work, unit=unit)
    return {"group": group, "name": f"test_case[{label}]", "params": {"impl": label},
            "stats": {"median": median}, "extra_info": info}


def _write(tmp_path: Path, benchmarks: list[dict], **meta) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"machine_info": {"python_version": "3.x", "cpu": {"brand_raw": "TestCPU", "count": 2}},
                                "datetime": "2026-01-02T03:04:05+00:00", "benchmarks": benchmarks, **meta}))
    return path


def _render(tmp_path: Path, benchmarks: list[dict], *extra: str) -> str:
    main([str(_write(tmp_path, benchmarks)), "--out", str(tmp_path / "out"), "--timelines", str(tmp_path / "none"),
          *extra])
    return (tmp_path / "out" / "report.md").read_text()


def test_report_states_ratios_rates_and_fraction_of_in_group_ceiling(tmp_path: Path) -> None:
    ours, peer = random.uniform(0.01, 0.1), random.uniform(0.1, 1.0)
    work = 1e9
    text = _render(tmp_path, [
        _bench("gemm 64x64", "ours", "ours", ours, work),
        _bench("gemm 64x64", "peer", "peer", peer, work),
        _bench("gemm 64x64", "peak", "ceiling", ours / 2, work),
    ])
    assert f"{peer / ours:.2f}x" in text
    assert f"{work / ours / 1e9:.2f} GFLOP/s" in text
    assert "| 50% |" in text  # ours runs at half the rate of the ceiling in its own group
    assert (tmp_path / "out" / "gemm.png").stat().st_size > 1000
    assert (tmp_path / "out" / "results.json").exists()


def _machine(a2a_medians: list[float], mm: tuple[float, float], copy: float) -> list[dict]:
    out = [_bench("ceilings matmul 2048^3 cpu", "bf16", "ceiling", mm[0], 2 * 2048**3, kind="matmul"),
           _bench("ceilings matmul 2048^3 cpu", "fp32", "ceiling", mm[1], 2 * 2048**3, kind="matmul"),
           _bench("ceilings memory copy 64MiB cpu", "copy", "ceiling", copy, 128 * MIB, "B", kind="memory")]
    for mib, med in zip((1, 8, 64), a2a_medians, strict=True):
        out.append(_bench("ceilings all_to_all loopback 4 gloo ranks cpu", f"{mib}MiB", "ceiling", med, mib * MIB, "B",
                          kind="all_to_all", ranks=4))
    return out


def test_results_are_matched_to_the_machine_ceiling_of_their_kind(tmp_path: Path) -> None:
    a2a = [random.uniform(1e-3, 1e-1) for _ in range(3)]
    mm = (random.uniform(0.1, 1.0), random.uniform(0.1, 1.0))
    copy = random.uniform(1e-3, 1e-2)
    gemm_t, comm_t, mem_t = (random.uniform(0.5, 2.0) for _ in range(3))
    data = [*_machine(a2a, mm, copy),
            _bench("fp8_gemm_nt compute-bound 2048x2048x7168 cpu", "ours", "ours", gemm_t, 2 * 2048**3),
            _bench("dispatch+combine 4096x2048 4 gloo ranks", "ours", "ours", comm_t, 50 * MIB, "B"),
            _bench("per_token_cast 4096x7168 cpu", "ours", "ours", mem_t, 90 * MIB, "B"),
            _bench("fp8_gemm_nt cuda 4096^3", "ours", "ours", 1e-3, 2 * 4096**3, device="cuda")]
    results, _ = load(_write(tmp_path, data))
    machine = machine_ceilings(results)
    by = {r.group.split()[0]: r for r in results if r.role == "ours" and r.device == "cpu"}
    assert ceiling_for(by["fp8_gemm_nt"], results, machine).median_s == min(mm)  # the faster matmul
    assert ceiling_for(by["dispatch+combine"], results, machine).work == 64 * MIB  # nearest size to 50 MiB
    assert ceiling_for(by["per_token_cast"], results, machine).group.startswith("ceilings memory")
    cuda = next(r for r in results if r.device == "cuda")
    assert ceiling_for(cuda, results, machine) is None  # no CUDA ceiling measured: no fraction
    text = _render(tmp_path, data)
    gemm_frac = (2 * 2048**3 / gemm_t) / (2 * 2048**3 / min(mm))
    comm_frac = (50 * MIB / comm_t) / (64 * MIB / a2a[2])
    assert f"| {report.fmt_frac(gemm_frac)} of matmul {'fp32' if mm[1] < mm[0] else 'bf16'} |" in text
    assert f"| {report.fmt_frac(comm_frac)} of all_to_all 64MiB |" in text
    assert "## Machine ceilings" in text and "all_to_all" in text
    assert (tmp_path / "out" / "gemm_cpu.png").stat().st_size > 1000
    assert (tmp_path / "out" / "comm_bandwidth.png").stat().st_size > 1000


def test_scaling_mfu_and_pipeline_sections(tmp_path: Path) -> None:
    medians = sorted(random.uniform(0.05, 1.0) for _ in range(3))
    mfu = random.uniform(0.01, 0.5)
    measured, predicted = random.uniform(0.1, 0.2), random.uniform(0.1, 0.2)
    data = [_bench("scaling step time vs tokens per batch (tiny) cpu", f"b{x}", "ours", m, x * 1e6, axis="tokens per batch",
                   x=x, tokens=x) for x, m in zip((256, 512, 1024), medians, strict=True)]
    data += [_bench("MFU bench.toml cpu", "mfu", "ours", 2.0, 1e10, mfu=mfu, tokens_per_s=1234.0, peak="CPU fp32 peak",
                    loadavg=3.5),
             _bench("pipeline step vs simulator, dualpipe", "ours", "ours", measured, predicted_s=predicted)]
    timelines = tmp_path / "timelines"
    timelines.mkdir()
    (timelines / "dualpipev_measured.png").write_bytes(b"\x89PNG fake")
    main([str(_write(tmp_path, data)), "--out", str(tmp_path / "out"), "--timelines", str(timelines)])
    text = (tmp_path / "out" / "report.md").read_text()
    assert "### step time vs tokens per batch" in text
    assert f"| 1024 | {medians[2] * 1e3:.1f} ms | {medians[2] / medians[0]:.2f}x | 4.00x |" in text
    assert (tmp_path / "out" / "scaling_tokens_per_batch.png").stat().st_size > 1000
    assert f"{100 * mfu:.2f}%" in text and "1,234" in text
    assert "load average while measuring 3.5-3.5 (**more runnable processes than the 2 cores" in text
    assert (tmp_path / "out" / "mfu.png").stat().st_size > 1000
    assert f"{measured / predicted:.3f}" in text
    assert "![dualpipev_measured](dualpipev_measured.png)" in text
    assert (tmp_path / "out" / "dualpipev_measured.png").read_bytes() == b"\x89PNG fake"


def test_skipped_peers_are_listed_with_their_reason(tmp_path: Path) -> None:
    junit = tmp_path / "junit.xml"
    junit.write_text("""<testsuites><testsuite>
<testcase classname="bench.bench_comm" name="test_dispatch_combine[deepspeed]"><skipped message="deepspeed not importable: no module"/></testcase>
<testcase classname="bench.bench_gemm" name="test_x[a]"><skipped message="not in the --quick selection"/></testcase>
<testcase classname="bench.bench_gemm" name="test_y"/>
</testsuite></testsuites>""")
    text = _render(tmp_path, [_bench("g", "ours", "ours", 0.1)], "--junit", str(junit))
    assert "| deepspeed not importable: no module | `bench.bench_comm::test_dispatch_combine[deepspeed]` |" in text
    assert "test_x[a]" not in text and "test_y" not in text


def test_default_folder_is_named_by_machine_and_date(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report, "RESULTS_DIR", tmp_path / "results")
    main([str(_write(tmp_path, [_bench("g", "ours", "ours", 0.1)])), "--timelines", str(tmp_path)])
    assert (tmp_path / "results" / "cpu-2026-01-02" / "report.md").exists()
    gpu = [_bench("ceilings matmul cuda", "bf16", "ceiling", 0.1, 1e12, device="cuda", gpu="NVIDIA H200")]
    main([str(_write(tmp_path, gpu)), "--timelines", str(tmp_path)])
    text = (tmp_path / "results" / "gpu-nvidia-h200-2026-01-02" / "report.md").read_text()
    assert "GPU: NVIDIA H200" in text


def test_without_matplotlib_the_report_has_tables_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_plots, "plt", None)
    ours, peer = random.uniform(0.01, 0.1), random.uniform(0.1, 1.0)
    text = _render(tmp_path, [_bench("gemm 1", "ours", "ours", ours, 1e9), _bench("gemm 1", "peer", "peer", peer, 1e9)])
    assert "tables only" in text and f"{peer / ours:.2f}x" in text
    assert not list((tmp_path / "out").glob("*.png"))


def test_bad_inputs_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope.json")])
    assert "results file not found" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit):
        main([str(bad)])
    assert "not a pytest-benchmark JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(_write(tmp_path, []))])
    assert "no benchmarks" in capsys.readouterr().err


def test_case_labels_come_from_impl_or_string_parameters() -> None:
    from bench.report import Result

    dtype = Result("g", "test_mm[torch.bfloat16]", "ceiling", 1.0, params={"dtype": "UNSERIALIZABLE[torch.bfloat16]"})
    assert dtype.label == "bfloat16"
    shaped = Result("g", "test_x[ours-64x64]", "ours", 1.0, params={"impl": "ours", "shape": [64, 64]})
    assert shaped.label == "ours"
    named = Result("g", "test_x[a]", "ours", 1.0, info={"impl": "fp32 2048^3"}, params={"impl": "a"})
    assert named.label == "fp32 2048^3"


def test_several_files_merge_and_a_later_case_replaces_an_earlier_one(tmp_path: Path) -> None:
    quick, full, peer = (random.uniform(0.1, 1.0) for _ in range(3))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _write(tmp_path / "a", [_bench("g", "ours", "ours", quick), _bench("g", "peer", "peer", peer)])
    second = _write(tmp_path / "b", [_bench("g", "ours", "ours", full), _bench("h", "ours", "ours", 0.5)])
    main([str(first), str(second), "--out", str(tmp_path / "out"), "--timelines", str(tmp_path)])
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"{peer / full:.2f}x" in text and "#### h" in text
    merged = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(merged["benchmarks"]) == 3 and merged["sources"] == [str(first), str(second)]
