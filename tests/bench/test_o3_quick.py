"""bench/o3.py --quick end to end as a subprocess: a real tiny model, real adapters, JSON with a summary."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"su", "du", "reference_su", "reference_du", "rd_drop_points_oracle", "general_drop_points_oracle",
        "train_seconds_per_request", "requests_in_sequence", "max_orthogonality"}


def test_quick_bench_prints_a_sane_summary(tmp_path):
    out = tmp_path / "o3.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "o3.py"), "--quick", "--out", str(out),
                           "--cache", str(tmp_path / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(proc.stdout)["summary"] == result["summary"]
    assert result["params"]["threads"] == 1  # two stall each other on a busy 2-core machine
    s = result["summary"]
    assert KEYS <= s.keys()
    assert s["requests_in_sequence"] == len(result["sequence"]) >= 2
    for k in ("su", "du", "reference_su", "reference_du", "max_orthogonality"):
        assert 0.0 <= s[k] <= 1.0, k
    assert s["su_before"] >= 0.8  # the tiny model really learnt the facts first
    assert s["su"] <= s["su_before"] - 0.3  # and the adapters made it forget them
    assert s["rd_drop_points_oracle"] == 0.0 and s["general_drop_points_oracle"] == 0.0  # oracle = base elsewhere
    assert s["max_orthogonality"] < s["max_orthogonality_without_penalty"]
    assert 0 < s["train_seconds_per_request"] < 120
    # only adapters are left on disk, in PEFT layout
    adapters = list((tmp_path / "cache").rglob("adapter_model.safetensors"))
    assert len(adapters) == s["requests_in_sequence"]
