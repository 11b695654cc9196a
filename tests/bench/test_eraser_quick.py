"""Smoke test of the eraser benchmark: --quick (tiny DDPM, 16 canvases) prints the JSON summary with the
invariants that hold for any model (pixels outside the mask untouched, rates that add up), not the targets."""

import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RATES = ("removal_rate", "baseline_removal_rate", "hallucination_rate", "baseline_hallucination_rate",
         "residual_rate", "baseline_residual_rate", "kept_digits_same_label", "detector_background_accuracy")


def test_quick_benchmark_prints_and_writes_summary(tmp_path):
    out, figure = tmp_path / "eraser.json", tmp_path / "figure.png"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "eraser.py"), "--quick", "--threads", "1",
                           "--out", str(out), "--figure", str(figure), "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == printed
    assert list(printed)[-1] == "summary"
    summary = printed["summary"]
    assert summary["canvases"] == 16
    for key in RATES:
        assert 0 <= summary[key] <= 1, key
    for prefix in ("", "baseline_"):
        total = sum(summary[f"{prefix}{k}_rate"] for k in ("removal", "hallucination", "residual"))
        assert math.isclose(total, 1.0, abs_tol=1e-6)
    assert summary["outside_mask_max_abs_diff"] == 0  # byte-exact outside the dilated mask, any model
    assert summary["kept_digits_same_label"] >= 0.9  # other digits' crops only reach into the mask's rim
    assert summary["seconds_per_image"] > 0 and summary["cost_ratio_to_baseline"] > 1  # two UNet passes a step
    assert summary["detector_background_accuracy"] > 0.9  # the judge knows what empty background looks like
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
