"""Smoke test of the diffusion benchmark: --quick produces the JSON summary with sane numbers (not targets)."""

import math

from tests.bench.quick import run_quick

KEYS = ("ua_min", "retained_acc_drop_points_max", "fid_after", "fid_before", "fid_retrain", "speedup_vs_retrain_min",
        "sequence_ua_min", "sequence_retained_acc_drop_points")


def test_quick_benchmark_prints_and_writes_summary(tmp_path):
    printed = run_quick("diffusion.py", tmp_path / "bench.json", "--threads", "1", "--grids", str(tmp_path / "grids"),
                        cwd=tmp_path)
    summary = printed["summary"]
    for key in KEYS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    for key in ("ua_min", "sequence_ua_min", "eval_classifier_test_acc"):
        assert 0 <= summary[key] <= 1, key
    assert summary["speedup_vs_retrain_min"] > 0 and summary["fid_before"] >= 0
    steps = printed["sequence"]["steps"]
    assert [s["forgotten"] for s in steps] == [[3], [3, 7]]  # the sequence builds on itself
    assert set(steps[-1]["UA"]) == {"3", "7"}
    for name in ("before", "after_first", "after_sequence"):
        assert (tmp_path / "grids" / f"grid_{name}.png").read_bytes()[:4] == b"\x89PNG"
