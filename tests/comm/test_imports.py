"""``from comm import all_to_all`` works in another trainer: it pulls in ops and torch, never
model/, dualpipe/ or launch/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_all_to_all_imports_without_upper_layers() -> None:
    code = ("import sys; from comm import all_to_all; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('model', 'dualpipe', 'launch')); "
            "assert not bad, bad; "
            "assert {'Buffer', 'EventOverlap', 'dispatch', 'combine', 'all_to_all_v', 'permute', 'unpermute'} "
            "<= set(all_to_all.__all__)")
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)
