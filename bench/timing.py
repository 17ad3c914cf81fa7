"""Reading a finished benchmark's median, also under ``--benchmark-disable`` (CI runs each
benchmark once untimed so it never rots; there are no statistics then)."""

from __future__ import annotations


def median_s(benchmark) -> float | None:
    """The median seconds of the rounds just measured, or None when timing is disabled."""
    stats = getattr(benchmark, "stats", None)
    return stats.stats.median if stats is not None else None
