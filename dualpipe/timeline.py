"""Pictures of a schedule: Chrome/Perfetto trace JSON and a PNG, one row per rank.

Both take per-rank lists of ``TimelineEvent`` (from ``simulate(...).timelines`` or from
``Pipeline.gather_timeline()`` after a measured step), so a simulated and a real run are drawn the
same way and can be put side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

from dualpipe.simulator import TimelineEvent

# Colours by kind (and split B): forward blue, backward green, input-grad B teal, W orange, F&B purple.
COLOURS = {"F": "#4C78A8", "B": "#54A24B", "Bi": "#72B7B2", "W": "#F58518", "FB": "#B279A2"}


def _kind(e: TimelineEvent) -> str:
    return "Bi" if e.kind == "B" and e.label.startswith("Bi") else e.kind


def to_chrome_trace(timelines: Sequence[Sequence[TimelineEvent]], path: str | None = None,
                    time_unit: float = 1e6) -> dict:
    """Chrome trace event format ("X" complete events; open in ui.perfetto.dev or chrome://tracing).

    ``time_unit``: microseconds per timeline unit (1e6 for measured seconds; for simulated
    costs, whatever makes them readable). Writes ``path`` when given; returns the dict.
    """
    events = []
    for r, evs in enumerate(timelines):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}})
        for e in evs:
            events.append({"name": e.label, "cat": _kind(e), "ph": "X", "pid": 0, "tid": r,
                           "ts": e.start * time_unit, "dur": (e.end - e.start) * time_unit})
    trace = {"traceEvents": events, "displayTimeUnit": "ms"}
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(trace, f)
    return trace


def save_png(timelines: Sequence[Sequence[TimelineEvent]], path: str, title: str = "", unit: str = "",
             labels: bool = True) -> None:
    """Draws one row per rank, each action a bar coloured by kind, labelled ``stage.chunk``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(timelines)
    end = max((e.end for evs in timelines for e in evs), default=1.0) or 1.0
    fig, ax = plt.subplots(figsize=(min(24, 6 + 0.25 * sum(len(t) for t in timelines) / max(n, 1)), 0.6 * n + 1.4))
    for r, evs in enumerate(timelines):
        for e in evs:
            ax.barh(r, e.end - e.start, left=e.start, height=0.8, color=COLOURS.get(_kind(e), "#999999"),
                    edgecolor="white", linewidth=0.5)
            if labels and (e.end - e.start) > end / 120:
                ax.text((e.start + e.end) / 2, r, e.label.lstrip("FBWi").replace("&B", "&"), ha="center",
                        va="center", fontsize=5, color="white")
    ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
    ax.invert_yaxis()
    ax.set_xlim(0, end)
    ax.set_xlabel(f"time{f' ({unit})' if unit else ''}")
    if title:
        ax.set_title(title)
    names = {"F": "F", "B": "B (full)", "Bi": "B (input grad)", "W": "W", "FB": "F&B"}
    kinds = sorted({_kind(e) for evs in timelines for e in evs}, key=list(names).index)
    ax.legend(handles=[Patch(color=COLOURS[k], label=names[k]) for k in kinds], loc="upper center",
              bbox_to_anchor=(0.5, -0.25 if n > 2 else -0.45), ncol=len(kinds), fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=150)
    plt.close(fig)
