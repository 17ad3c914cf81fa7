"""Timeline export from the simulator: Chrome trace structure and a PNG on disk."""

from __future__ import annotations

import json

from dualpipe import Costs, dualpipev_schedule, save_png, simulate, to_chrome_trace


def test_chrome_trace_and_png_from_simulation(tmp_path) -> None:
    r = simulate(dualpipev_schedule(3, 7), Costs(F=1, B=2, W=1, FB=2.5))
    trace = to_chrome_trace(r.timelines, str(tmp_path / "t.json"), time_unit=1000)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(spans) == sum(len(t) for t in r.timelines)
    first = r.timelines[1][0]
    match = [e for e in spans if e["tid"] == 1 and e["name"] == first.label]
    assert match and match[0]["ts"] == first.start * 1000 and match[0]["dur"] == (first.end - first.start) * 1000
    assert {e["cat"] for e in spans} == {"F", "B", "Bi", "W", "FB"}
    assert json.loads((tmp_path / "t.json").read_text()) == trace
    save_png(r.timelines, str(tmp_path / "t.png"), title="DualPipeV")
    assert (tmp_path / "t.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
