"""Smoke test of the classifier benchmark: --quick produces the JSON summary with sane numbers (not targets)."""

import math

from tests.bench.quick import run_quick

KEYS = ("speedup_vs_retrain_min_iau", "max_avg_gap_points_5_10pct", "max_mia_gap_points_5_10pct",
        "class_forget_accuracy_default_method", "sequence_max_gap_points_served_default")


def test_quick_benchmark_prints_and_writes_summary(tmp_path):
    printed = run_quick("classifier.py", tmp_path / "bench.json", cwd=tmp_path)
    summary = printed["summary"]
    assert printed["threads"] == 1  # two stall each other on a busy 2-core machine
    for key in KEYS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]), key
    assert summary["speedup_vs_retrain_min_iau"] > 0
    for key in ("max_avg_gap_points_5_10pct", "max_mia_gap_points_5_10pct", "sequence_max_gap_points_served_default"):
        assert 0 <= summary[key] <= 100, key
    # the gap of the seed means never exceeds the mean of the per-seed gaps (|mean of d| <= mean of |d|)
    for key in ("max_avg_gap_points_5_10pct", "max_mia_gap_points_5_10pct"):
        assert summary[key] <= summary[f"{key}_per_seed"] + 1e-9, key
    assert "random_5pct" in printed["blocks"][0]["gap_of_means"]
    assert 0 <= summary["class_forget_accuracy_default_method"] <= 1
    assert summary["class_default_method"] == "salun"
    block = printed["blocks"][0]
    sequence = block["sequence"]
    assert sequence["requests_with_cached_gradient"] == sequence["steps"] * sequence["seeds"]  # refreshed each time
    # what each result says of itself: a share per method, and counts that cannot exceed the requests
    assert set(summary["criterion_met_share_5_10pct"]) == {"iau", "iau-cold", "salun"}
    # each forget kind is served by the daemon's default for it alone (daemon/config.py)
    assert summary["served_methods"] == {"sample_ids": ["iau", "iau-cold"], "class": ["salun"]}
    assert all(0 <= share <= 1 for share in summary["criterion_met_share_5_10pct"].values())
    assert 0 <= sequence["requests_short_of_criterion"] <= sequence["steps"] * sequence["seeds"]
    for method in ("retrain", "iau", "salun"):
        fields = block["aggregate"]["random_5pct"][method]
        # a wrongly predicted row's true label has at most half the probability: mean confidence <= (1 + acc) / 2
        for rows in ("forget", "test"):
            assert 0 < fields[f"{rows}_conf"]["mean"] <= (1 + fields[f"{rows}_acc"]["mean"]) / 2 + 1e-6, method
    last = sequence["checkpoints"][max(sequence["checkpoints"])]
    assert summary["sequence_max_gap_points_served_default"] == last["avg_gap"]
    retrain = block["aggregate"]["class"]["retrain"]
    assert retrain["forget_acc"]["mean"] == 0.0  # a model never trained on a class never predicts it
    assert retrain["test_acc"]["mean"] > 0.8  # the reference itself is a working model
