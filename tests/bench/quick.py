"""Runs a benchmark's --quick mode as its own process, as a user runs it, and reads back what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_quick(script: str, out: Path, *args: str, cwd: Path = REPO, timeout: float = 300) -> dict:
    """`bench/<script> --quick --out OUT ARGS`: it must exit 0, print the JSON it writes, and end in its summary."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--out", str(out), *args],
                          cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result)[-1] == "summary"
    assert json.loads(proc.stdout)["summary"] == result["summary"]  # what it prints is what it writes
    return result
